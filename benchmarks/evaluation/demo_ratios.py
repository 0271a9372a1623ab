"""Which ratio keeps the default answering at the demo's settings (`svdllm demo`'s calibration: 16 × 1024 tokens of
wikitext2,alpaca, 4 gradient windows): the default preset at several ratios in one run, then greedy replies to the
demo's prompt and three more, and the WikiText-2 perplexity on the demo's 8 test windows.
Usage: python benchmarks/evaluation/demo_ratios.py 0.2,0.3 MODELS_DIR > benchmarks/results/demo_ratios/ratios.json"""
import json
import os
import sys
import time

import svdllm
from svdllm.config import CalibrationConfig, CompressConfig
from svdllm.evaluation import generate, perplexity

ratios = [float(r) for r in sys.argv[1].split(",")]
out = sys.argv[2]
prompts = ["What is the capital of France? Answer in one sentence.", "Name three colors of the rainbow.",
           "How many legs does a spider have?", "Write one sentence about the sea."]
model, tok = svdllm.load_model("smollm2-135m")
cal = CalibrationConfig(dataset="wikitext2,alpaca", nsamples=16, seqlen=1024, grad_samples=4,
                        data_dir=os.environ.get("SVDLLM_DATA_DIR", "../shared/data"))
rows = {"command": "python benchmarks/evaluation/demo_ratios.py " + " ".join(sys.argv[1:]),
        "dense": {p: generate(model, tok, p, 40) for p in prompts}}
t = time.perf_counter()
svdllm.compress(model, tok, CompressConfig(ratio=ratios, calibration=cal), out=out, overwrite=True, progress=False)
rows["compress_s"] = time.perf_counter() - t
for r in ratios:
    m = svdllm.load(f"{out}/ratio-{r:g}")
    rows[str(r)] = {p: generate(m, tok, p, 40) for p in prompts}
    rows[str(r)]["ppl8"] = perplexity(m, tok, "wikitext2", cal.data_dir, 2048, 8, progress=False)["ppl"]
print(json.dumps(rows, indent=1))
