"""Which target should the closed-form update fit? A small, quick comparison on SmolLM2-135M (svd-llm, uniform).

Each linear's W_u is re-fitted by least squares on X′, the inputs it receives in the compressed model. The target
is either W·X′ (the dense weight on those same inputs: SVD-LLM's released code) or W·X (the dense model's own
output: also undoes the drift of the layers before). Variants, by the input groups fitted to W·X:
  none               no update
  closed-form        no group (every linear fitted to W·X′)
  closed-form-drift  the attention (q/k/v and o)
  drift-all          every group (the experiment-only variant the issue text describes; registered here only)

The calibration is deliberately small (8 × 512 tokens, a few minutes per variant on one core) and perplexity is
taken on the first 8 WikiText-2 windows: a screen for the direction of the effect, not protocol numbers.

Usage: python benchmarks/updates/closed_form_targets.py [--ratio 0.4] [--variants none,closed-form,...] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import svdllm
from svdllm import update
from svdllm.evaluation.perplexity import perplexity

# experiment-only: every input group fitted to the dense model's outputs
update.UPDATES["drift-all"] = "closed-form with every group fitted to W·X (experiment only)"
update.DRIFT_GROUPS["drift-all"] = ("attn_in", "attn_out", "mlp_in", "mlp_out")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--variants", default="none,closed-form,closed-form-drift,drift-all")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for variant in args.variants.split(","):
        model, tok = svdllm.load_model(args.model)
        cfg = svdllm.CompressConfig(preset="paper", ratio=args.ratio, update=variant, cache_dir="",
                                    calibration=svdllm.CalibrationConfig(nsamples=args.nsamples, seqlen=args.seqlen))
        t = time.perf_counter()
        svdllm.compress(model, tok, cfg, progress=False)
        seconds = time.perf_counter() - t
        ppl = perplexity(model, tok, "wikitext2", max_windows=args.windows, progress=False)["ppl"]
        rows.append({"variant": variant, "ratio": args.ratio, "ppl_wikitext2_first_windows": ppl,
                     "windows": args.windows, "calibration": f"{args.nsamples}x{args.seqlen}",
                     "compress_s": round(seconds, 1), "threads": torch.get_num_threads()})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        from svdllm.utils.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
