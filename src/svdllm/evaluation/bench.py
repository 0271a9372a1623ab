"""Efficiency: prefill and decode throughput, peak memory, parameters and bytes on disk, always as a ratio against the
dense model measured in the same run. A shared machine drifts by tens of percent over minutes, so the CLI measures
the two models alternately, round after round, each in a fresh process, and reports the median over rounds of the
ratio within a round: only the ratio travels between machines.

Peak memory is the resident-set high-water mark on the CPU (reset between measurements through
/proc/self/clear_refs, Linux) and torch.cuda.max_memory_allocated on a GPU.
"""
from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch

from ..errors import SvdllmError


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def disk_bytes(path: str | Path | None) -> int | None:
    if path is None or not Path(path).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _decode_seconds(model, ids: torch.Tensor, steps: int, device) -> float:
    """Wall time of `steps` greedy single-token forwards with the KV cache, after an untimed prefill."""
    from ..nn.kv_cache import CACHE_KW, output_cache

    out = model(input_ids=ids, use_cache=True)
    past, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, **{CACHE_KW: past}, use_cache=True)
        past, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - t


@torch.no_grad()
def measure(model, batch_sizes=(1, 4), prompt_lens=(128, 512), new_tokens: int = 32, repeats: int = 3,
            vocab: int | None = None, seed: int = 0) -> list[dict]:
    """Prefill tokens/s (one forward over the prompt, no cache) and decode tokens/s (the new_tokens − 1
    single-token steps that follow the prefill of a greedy generation, timed on their own) for every batch size
    and prompt length; each the median of `repeats` runs."""
    if new_tokens < 2:
        raise SvdllmError(f"--new-tokens must be at least 2 (the first token comes from the prefill), got {new_tokens}.")
    device = next(model.parameters()).device
    vocab = vocab or model.config.vocab_size
    model.eval()
    rows = []
    g = torch.Generator().manual_seed(seed)
    for b in batch_sizes:
        for n in prompt_lens:
            ids = torch.randint(0, vocab, (b, n), generator=g).to(device)
            model(input_ids=ids, use_cache=False)  # warm-up
            _reset_peak(device)
            prefill = _timed(lambda: model(input_ids=ids, use_cache=False), device, repeats)
            decode = statistics.median(_decode_seconds(model, ids, new_tokens - 1, device) for _ in range(repeats))
            rows.append({"batch": b, "prompt_len": n, "new_tokens": new_tokens,
                         "prefill_tok_s": b * n / prefill,
                         "decode_tok_s": b * (new_tokens - 1) / decode,
                         "peak_mem_mb": _peak_mb(device)})
    return rows


@torch.no_grad()
def kv_cache_bytes(model, lengths=(2048,), batch: int = 1, seed: int = 0) -> list[dict]:
    """Bytes of the KV cache after a prefill of each length: transformers' dynamic cache, and the low-rank one
    where the model has low-rank k/v projections."""
    from transformers import DynamicCache

    from ..nn.kv_cache import CACHE_KW, cache_nbytes, low_rank_kv_cache
    from ..nn.low_rank import LowRankLinear

    device = next(model.parameters()).device
    low_rank = any(isinstance(m, LowRankLinear) for n, m in model.named_modules() if n.endswith(("k_proj", "v_proj")))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (batch, n), generator=g).to(device)
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1)
        row = {"tokens": n, "batch": batch, "dynamic_bytes": cache_nbytes(cache)}
        del cache
        if low_rank:
            with low_rank_kv_cache(model) as cache:
                model(input_ids=ids, **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1)
                row["low_rank_bytes"] = cache_nbytes(cache)
            row["low_rank_ratio"] = row["low_rank_bytes"] / row["dynamic_bytes"]
        rows.append(row)
    return rows


def model_facts(model, path=None) -> dict:
    from ..models.loading import BUILTIN_MODELS, cache_root

    if isinstance(path, str) and path in BUILTIN_MODELS:  # its safetensors conversion in the model cache
        path = cache_root() / "models" / path
    return {"params": sum(p.numel() for p in model.parameters()),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "disk_bytes": disk_bytes(path)}


_TIMED = ("prefill_tok_s", "decode_tok_s", "peak_mem_mb")


def _median_row(rows: list[dict]) -> dict:
    row = dict(rows[0])
    for k in _TIMED:
        vals = [r[k] for r in rows if r.get(k) is not None]
        row[k] = statistics.median(vals) if vals else None
    return row


def merge_rounds(runs: list[dict]) -> dict:
    """One model's measurements from several rounds: facts and KV cache from the first, every timed value the
    median over rounds."""
    merged = {**runs[0], "rounds": len(runs)}
    merged["rows"] = [_median_row([run["rows"][i] for run in runs]) for i in range(len(runs[0]["rows"]))]
    return merged


def with_ratios(runs: list[dict], dense_runs: list[dict]) -> list[dict]:
    """The compressed model's rows, each with its speed and memory against dense as the median over rounds of the
    ratio within a round (round i of one model was measured right after round i of the other)."""
    out = []
    for i, first in enumerate(runs[0]["rows"]):
        rows = [run["rows"][i] for run in runs]
        ref = [run["rows"][i] for run in dense_runs]
        ratios = {"prefill_speedup": [r["prefill_tok_s"] / d["prefill_tok_s"] for r, d in zip(rows, ref)],
                  "decode_speedup": [r["decode_tok_s"] / d["decode_tok_s"] for r, d in zip(rows, ref)],
                  "peak_mem_ratio": [r["peak_mem_mb"] / d["peak_mem_mb"] for r, d in zip(rows, ref)
                                     if r["peak_mem_mb"] and d["peak_mem_mb"]]}
        row = _median_row(rows)
        row.update({k: statistics.median(v) for k, v in ratios.items() if v})
        row["prefill_speedup_rounds"] = ratios["prefill_speedup"]
        row["decode_speedup_rounds"] = ratios["decode_speedup"]
        out.append(row)
    return out


def release(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def default_baseline(model: str) -> str:
    """The dense model a model is benchmarked against by default: the base model recorded in the manifest of a
    directory written by svdllm; "none" where none is recorded, and for any other model."""
    from ..io.manifest import is_model_dir, read_manifest

    return (read_manifest(model).get("base_model") or "none") if is_model_dir(model) else "none"


def keep_bench_result(model: str, result: dict) -> None:
    """Merge a benchmark's result into svdllm_bench.json beside the model (a directory written by svdllm; any
    other model keeps nothing), for `svdllm compare`."""
    from ..io.manifest import is_model_dir
    from ..io.results import BENCH_NAME, merge_results

    if is_model_dir(model):
        merge_results(model, BENCH_NAME, result)


def machine() -> dict:
    """The CPU (its model name), cores, torch threads and GPU a benchmark ran on."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
