"""Allocation: *how many* ranks each matrix keeps under one parameter budget (the factors come from a method).

R is the fraction of the compressed matrices' parameters removed (PROTOCOL.md): an m×n matrix at rank r keeps
r(m+n) parameters. An allocator returns a rank per matrix, or None where factorizing would not save parameters
and the matrix stays dense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import SvdllmError


@dataclass(frozen=True)
class MatrixInfo:
    name: str  # e.g. model.layers.3.self_attn.q_proj
    out_features: int
    in_features: int

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def lowrank_params(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)


def uniform_rank(m: int, n: int, ratio: float) -> int:
    """r = floor((1 − R)·m·n / (m + n)), the rank that removes the fraction R of an m×n matrix."""
    return math.floor((1.0 - ratio) * m * n / (m + n))


def allocate_uniform(matrices: list[MatrixInfo], ratio: float) -> dict[str, int | None]:
    ranks: dict[str, int | None] = {}
    for mat in matrices:
        r = uniform_rank(mat.out_features, mat.in_features, ratio)
        if r < 1:
            raise SvdllmError(
                f"Ratio {ratio} leaves rank {r} for {mat.name} ({mat.out_features}×{mat.in_features}); "
                "use a lower --ratio."
            )
        ranks[mat.name] = None if mat.lowrank_params(r) >= mat.dense_params else r
    return ranks


ALLOCATORS = {"uniform": allocate_uniform}
ALLOCATOR_SUMMARIES = {"uniform": "the same ratio for every matrix: r = floor((1−R)·m·n/(m+n))"}


def allocate(name: str, matrices: list[MatrixInfo], ratio: float) -> dict[str, int | None]:
    if name not in ALLOCATORS:
        raise SvdllmError(f"Unknown allocator {name!r}; available: {', '.join(ALLOCATORS)} (see `svdllm allocators`).")
    return ALLOCATORS[name](matrices, ratio)


def param_counts(matrices: list[MatrixInfo], ranks: dict[str, int | None]) -> dict:
    dense = sum(m.dense_params for m in matrices)
    kept = sum(m.dense_params if ranks[m.name] is None else m.lowrank_params(ranks[m.name]) for m in matrices)
    return {"linear_dense": dense, "linear_kept": kept, "achieved_ratio": 1.0 - kept / dense}
