"""Evaluation and benchmark results kept beside the model they describe, so `svdllm compare` can find them.

`svdllm_eval.json` / `svdllm_bench.json` in a model directory; each write merges into what is there and is atomic.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..utils.atomic import atomic_write_text

EVAL_NAME = "svdllm_eval.json"
BENCH_NAME = "svdllm_bench.json"


def ppl_key(dataset: str, result: dict) -> str:
    """The name a perplexity result is kept under: the dataset, marked when it covers only some windows."""
    w, total = result["windows"], result["total_windows"]
    return dataset if w == total else f"{dataset}[{w}/{total}]"


def zero_shot_key(limit: int | None, complete: bool = True) -> str:
    """The name a zero-shot result is kept under, marked when it covers the first `limit` documents or not all."""
    return "zero_shot" + (f"[limit={limit}]" if limit else "") + ("" if complete else "[partial]")


def how_made(manifest: dict) -> dict:
    """What a compressed model's results are read against: method, allocator, update, ratio and size."""
    return {"method": manifest["method"], "alloc": manifest.get("alloc", "uniform"),
            "update": manifest.get("update", "none"), "ratio": manifest["ratio"],
            "achieved": manifest["params"]["achieved_ratio"], "params": manifest["params"]["model_after"],
            "base_model": manifest.get("base_model")}


def read_results(model_dir: str | os.PathLike, name: str) -> dict:
    path = Path(model_dir) / name
    return json.loads(path.read_text()) if path.is_file() else {}


def merge_results(model_dir: str | os.PathLike, name: str, update: dict) -> None:
    """Merge `update` (one level deep) into the model directory's results file; a no-op for non-directories."""
    d = Path(model_dir)
    if not d.is_dir():
        return
    data = read_results(d, name)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    atomic_write_text(d / name, json.dumps(data, indent=1, default=str))
