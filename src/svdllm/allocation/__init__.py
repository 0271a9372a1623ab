"""Allocation: *how many* ranks each matrix keeps under one parameter budget (the factors come from a method), and
with `--bits` its width too, under a byte budget (joint.py). Every allocator answers with an `Allocation` per ratio.

Any allocator applies to any method: the spectrum-driven ones read the singular values (and, for `global` and
`dipsvd`, the gradient statistics) that the method's decompositions and the calibration produce.
"""
from .allocators import ALLOCATORS, Allocation, Allocator, Spectrum, get_allocator
from .joint import JointAllocation, Widths, joint_allocation
from .budget import TOLERANCE, MatrixInfo, budget, fit_to_budget, param_counts

ALLOCATOR_SUMMARIES = {name: cls.summary for name, cls in ALLOCATORS.items()}
# Raised with every change that can change what an allocator chooses from the same statistics: an allocation
# recorded in the statistics cache (calibration/cache.py, AllocationRecord) by another revision is made anew, since
# neither the options nor the package version (unchanged between releases) would tell a fixed allocator from the
# old one. 2: a matrix type the global allocator could not measure takes the measured types' scale (refine.py).
REVISION = 2


def allocate_uniform(matrices: list[MatrixInfo], ratio: float) -> dict[str, int | None]:
    return ALLOCATORS["uniform"]().allocate(matrices, ratio)


def allocate(name: str, matrices: list[MatrixInfo], ratio: float, spectra: dict[str, Spectrum] | None = None,
             multiple: int = 1, **options) -> dict[str, int | None]:
    return get_allocator(name, **options).allocate(matrices, ratio, spectra, multiple)


__all__ = ["ALLOCATORS", "ALLOCATOR_SUMMARIES", "Allocation", "Allocator", "JointAllocation", "Widths", "joint_allocation", "MatrixInfo", "REVISION", "Spectrum", "TOLERANCE",
           "allocate", "allocate_uniform", "budget", "fit_to_budget", "get_allocator", "param_counts"]
