"""A quantized svdllm directory, exported to compressed-tensors and loaded by plain transformers, against
svdllm.load of the same directory: logits on WikiText-2 test windows, their perplexity, load times, bytes on disk.

Usage: python benchmarks/quantization/export_check.py QUANTIZED_DIR EXPORT_DIR OUT.json [WINDOWS]
"""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main(quantized: str, export: str, out: str, windows: int = 2) -> None:
    import svdllm
    from svdllm.data import eval_windows, load_text, tokenize_text
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "svdllm.cli", "export", quantized, "--format", "compressed-tensors",
                    "--out", export, "--overwrite", "-q"], check=True)
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    ours, tok = svdllm.load(quantized, with_tokenizer=True)
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    theirs = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    theirs_s = time.perf_counter() - t
    ids = eval_windows(tokenize_text(tok, load_text("wikitext2", "test")), 2048, windows)
    worst, nll = 0.0, {"svdllm.load": 0.0, "transformers": 0.0}
    with torch.no_grad():
        for w in ids:
            a, b = ours(w[None]).logits[0].float(), theirs(w[None]).logits[0].float()
            worst = max(worst, float((a - b).abs().max()))
            for name, logits in (("svdllm.load", a), ("transformers", b)):
                nll[name] += float(F.cross_entropy(logits[:-1], w[1:], reduction="sum"))
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    disk = {name: sum(f.stat().st_size for f in Path(d).glob("*.safetensors")) for name, d in
            (("svdllm", quantized), ("compressed-tensors", export))}
    result = {"quantized": quantized, "export": export, "windows": int(ids.shape[0]), "max_abs_logit_difference": worst,
              "ppl": {k: math.exp(v / tokens) for k, v in nll.items()}, "export_s": export_s,
              "load_s": {"svdllm.load": ours_s, "transformers": theirs_s}, "safetensors_bytes": disk,
              "quantization_config": json.loads((Path(export) / "config.json").read_text())["quantization_config"]["format"]}
    Path(out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "quantized"}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:]))
