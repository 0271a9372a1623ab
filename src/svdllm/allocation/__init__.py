"""Allocation: *how many* ranks each matrix keeps under one parameter budget (the factors come from a method).

Any allocator applies to any method: the spectrum-driven ones read the singular values (and, for `global` and
`dipsvd`, the gradient statistics) that the method's decompositions and the calibration produce.
"""
from .allocators import ALLOCATORS, Allocator, Spectrum, get_allocator
from .budget import TOLERANCE, MatrixInfo, budget, fit_to_budget, param_counts

ALLOCATOR_SUMMARIES = {name: cls.summary for name, cls in ALLOCATORS.items()}


def allocate_uniform(matrices: list[MatrixInfo], ratio: float) -> dict[str, int | None]:
    return ALLOCATORS["uniform"]().allocate(matrices, ratio)


def allocate(name: str, matrices: list[MatrixInfo], ratio: float, spectra: dict[str, Spectrum] | None = None,
             multiple: int = 1, **options) -> dict[str, int | None]:
    return get_allocator(name, **options).allocate(matrices, ratio, spectra, multiple)


__all__ = ["ALLOCATORS", "ALLOCATOR_SUMMARIES", "Allocator", "MatrixInfo", "Spectrum", "TOLERANCE", "allocate",
           "allocate_uniform", "budget", "fit_to_budget", "get_allocator", "param_counts"]
