"""The gradient pass on SmolLM2-135M: the layer-by-layer (streamed) pass against autograd through the whole model.

1. Equality: in float64, on the first 2 protocol calibration windows (WikiText-2 validation, 2048 tokens, seed 0),
   every linear's row Fisher, output-gradient diagonal and output-gradient Gram from `gradient_stats` against one
   backward through the whole model (the computation written out here, independently of svdllm's).
2. Cost: the pass as the default runs it (float32, the protocol's 8 gradient windows, with the Grams), in a fresh
   process per code version so that each peak RSS is its own: this checkout's code and, with --before-src, an
   older checkout's (the whole-model pass). Peak RSS is the process's ru_maxrss, the model and data included.

Raw result: OUT (JSON). Usage: python benchmarks/scale/gradients_smollm2.py OUT.json [--before-src OLD/src]
(about 10 minutes alone on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, tempfile, time, torch
import svdllm
from svdllm.calibration import gradient_stats
from svdllm.data import calibration_set
model, tok = svdllm.load_model("smollm2-135m")
windows = calibration_set(tok, "wikitext2", 64, 2048, 0, sys.argv[1])[:8]
def rss():  # this process's high-water mark (VmHWM: ru_maxrss would carry the forking parent's over exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
before = rss()
t = time.perf_counter()
try:  # this version: each layer's Grams written to disk as the pass leaves the layer
    from svdllm.calibration import LayerGrams
    with tempfile.TemporaryDirectory() as d:
        grams = LayerGrams(d)
        gradient_stats(model, windows, progress=False, output_grams=True, sink=grams.write)
except ImportError:  # before: every Gram held in memory
    gradient_stats(model, windows, progress=False, output_grams=True)
print(json.dumps({"svdllm": svdllm.__file__, "windows": len(windows), "seconds": time.perf_counter() - t,
                  "peak_rss_before_pass_mb": before, "peak_rss_mb": rss(), "threads": torch.get_num_threads()}))
"""


def whole_model(model, windows):
    """Σ over windows of each linear's (∂L/∂W)² row sums and (∂L/∂y)ᵀ(∂L/∂y), one backward of the whole model per
    window, the loss a window's mean next-token cross-entropy in float64."""
    import torch

    from svdllm.models.families import LINEAR_NAMES

    lin = {f"model.layers.{i}.{n}": layer.get_submodule(n) for i, layer in enumerate(model.model.layers)
           for n in LINEAR_NAMES}
    rows = {k: 0 for k in lin}
    grams = {k: 0 for k in lin}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lin.values():
        m.weight.requires_grad_(True)
    for w in windows:
        seen = {}
        handles = [m.register_forward_hook(lambda mod, a, out, k=k: seen.__setitem__(k, out)) for k, m in lin.items()]
        logits = model(input_ids=w[None], use_cache=False).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, w[1:])
        for h in handles:
            h.remove()
        names = list(lin)
        got = torch.autograd.grad(loss, [lin[k].weight for k in names] + [seen[k] for k in names])
        for k, gw, gy in zip(names, got[: len(names)], got[len(names):]):
            rows[k] = rows[k] + gw.pow(2).sum(1)
            gy = gy.reshape(-1, gy.shape[-1])
            grams[k] = grams[k] + gy.T @ gy
        del got, logits, loss
    return rows, grams


def equality(data_dir: str) -> dict:
    import torch

    import svdllm
    from svdllm.calibration import gradient_stats
    from svdllm.data import calibration_set

    model, tok = svdllm.load_model("smollm2-135m")
    model = model.double()
    windows = calibration_set(tok, "wikitext2", 64, 2048, 0, data_dir)[:2]
    t = time.perf_counter()
    stats = gradient_stats(model, windows, progress=False, output_grams=True)
    streamed_s = time.perf_counter() - t
    t = time.perf_counter()
    rows, grams = whole_model(model, windows)
    whole_s = time.perf_counter() - t
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))  # noqa: E731
    worst = {"rows": max(rel(stats.rows[k], rows[k]) for k in rows),
             "outputs": max(rel(stats.outputs[k], grams[k].diagonal()) for k in rows),
             "output_grams": max(rel(stats.output_grams[k], grams[k]) for k in rows)}
    return {"dtype": "float64", "windows": 2, "seqlen": 2048, "linears": len(rows),
            "max_relative_difference": worst, "streamed_s": streamed_s, "whole_model_s": whole_s,
            "threads": torch.get_num_threads()}


def cost(src: str | None, data_dir: str) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    scratch = os.path.join(os.path.expanduser("~"), ".cache", "svdllm", "scratch")  # a disk, as the cache's
    os.makedirs(scratch, exist_ok=True)
    out = subprocess.run([sys.executable, "-c", CHILD, data_dir, scratch], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--before-src", help="src/ of an older checkout, for its gradient pass's cost")
    ap.add_argument("--data-dir", default=os.environ.get("SVDLLM_DATA_DIR", "../shared/data"))
    args = ap.parse_args()
    result = {"command": " ".join(["python"] + sys.argv)}
    previous = json.load(open(args.out)) if os.path.exists(args.out) else {}
    if "equality" in previous:  # measured already (it takes the longest): kept, the costs measured again
        result["equality"] = previous["equality"]
    else:
        result["equality"] = equality(args.data_dir)
    print(json.dumps(result["equality"]), flush=True)
    if args.before_src:
        result["before"] = cost(args.before_src, args.data_dir)
        print(json.dumps(result["before"]), flush=True)
    result["after"] = cost(None, args.data_dir)
    print(json.dumps(result["after"]), flush=True)
    with open(args.out + ".tmp", "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
