"""Data-parallel calibration on torch.distributed: `torchrun --nproc-per-node N svdllm compress ...`.

Every rank builds the same calibration windows and runs its share (windows rank, rank + N, ...) through the
layer-by-layer pass; the sums (XᵀX, Σ|x|, token counts, gradient moments) are all-reduced in float64, so every
rank holds the statistics of all windows. The matrices are then factorized round-robin across ranks and the
factors gathered, and rank 0 alone writes the cache and the model. gloo on the CPU, NCCL on GPUs. Without
torchrun (or with one process) every function here is the identity.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> str | None:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns this rank's device, if CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return None


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows."""
    return windows[rank()::world_size()] if active() else windows


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element-wise sums over ranks (float64 stays float64), on the CPU when done."""
    if not active():
        return tensors
    device = _comm_device()
    out = {}
    for key in sorted(tensors):  # the same order on every rank
        t = tensors[key].to(device).contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out[key] = t.to("cpu")
    return out


def sum_int(value: int) -> int:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def all_agree(flag: bool) -> bool:
    """True only if `flag` holds on every rank (e.g. a cache entry every rank can read)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mine(index: int) -> bool:
    """Round-robin ownership of work item `index` (a matrix to factorize)."""
    return index % world_size() == rank()


def gather_merge(local: dict) -> dict:
    """Union of every rank's dict (the factors each rank computed), on every rank."""
    if not active():
        return local
    parts = [None] * world_size()
    dist.all_gather_object(parts, local)
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def barrier() -> None:
    if active():
        dist.barrier()
