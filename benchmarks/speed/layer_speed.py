"""Per-layer CPU speed of LowRankLinear against the dense nn.Linear it replaces, next to the FLOP ratio.

For every distinct linear shape of the model (SmolLM2-135M: q/o 576→576, k/v 576→192, gate/up 576→1536,
down 1536→576) and every ratio R, the uniform rank r = ⌊(1−R)·m·n/(m+n)⌋ (what `--alloc uniform` gives) is
timed on a prefill-sized input (batch × tokens rows) and on one decode token, in float32 on this CPU, with
torch.utils.benchmark (warm-up, thread count fixed, median of adaptive runs). Only the shapes matter, so the
weights are random; `--rank-multiple` shows what rounding ranks for the kernels buys.

Usage: python benchmarks/speed/layer_speed.py [--model smollm2-135m] [--ratios 0.2,0.4,0.6] [--tokens 512]
       [--threads 2] [--rank-multiple 1] [--compile] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from torch import nn
from torch.utils import benchmark

from svdllm.nn.low_rank import LowRankLinear
from svdllm.models.families import LINEAR_NAMES


def linear_shapes(model_spec: str) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of the first decoder layer's compressed linears, from the config."""
    from transformers import AutoConfig

    from svdllm.models.loading import BUILTIN_MODELS, cache_root

    path = cache_root() / "models" / model_spec if model_spec in BUILTIN_MODELS else model_spec
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    layer = model.model.layers[0]
    return {n: (layer.get_submodule(n).in_features, layer.get_submodule(n).out_features) for n in LINEAR_NAMES}


def time_module(module: nn.Module, x: torch.Tensor, threads: int) -> float:
    t = benchmark.Timer("m(x)", globals={"m": module, "x": x}, num_threads=threads)
    return t.adaptive_autorange(min_run_time=0.5).median


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", default="0.2,0.4,0.6")
    p.add_argument("--tokens", type=int, default=512, help="rows of the prefill-sized input")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--rank-multiple", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd modules")
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    shapes = linear_shapes(args.model)
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, shape in shapes.items():
        by_shape.setdefault(shape, []).append(name)
    rows = []
    for (n, m), names in by_shape.items():
        dense = nn.Linear(n, m, bias=False)
        inputs = {"prefill": torch.randn(args.tokens, n), "decode": torch.randn(1, n)}
        t_dense = {k: time_module(dense, x, args.threads) for k, x in inputs.items()}
        for ratio in (float(r) for r in args.ratios.split(",")):
            rank = int((1 - ratio) * m * n / (m + n))
            rank = max(args.rank_multiple, rank // args.rank_multiple * args.rank_multiple)
            low = LowRankLinear(n, m, rank)
            row = {"matrices": "/".join(names), "in": n, "out": m, "ratio": ratio, "rank": rank,
                   "flop_ratio": rank * (m + n) / (m * n)}
            for k, x in inputs.items():
                t_low = time_module(low, x, args.threads)
                row[f"{k}_dense_us"], row[f"{k}_lowrank_us"] = 1e6 * t_dense[k], 1e6 * t_low
                row[f"{k}_speedup"] = t_dense[k] / t_low
                if args.compile:
                    row[f"{k}_compiled_speedup"] = t_dense[k] / time_module(torch.compile(low), x, args.threads)
            rows.append(row)
            print(f"{row['matrices']:>15s} {n}→{m} R={ratio:.1f} r={rank:4d}  FLOPs ×{row['flop_ratio']:.2f}  "
                  f"prefill ({args.tokens} tok) ×{row['prefill_speedup']:.2f}  decode ×{row['decode_speedup']:.2f}",
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "tokens": args.tokens, "threads": args.threads,
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
