"""Rank and bit width chosen together (`--bits`): the budget is the compressed linears' float32 bytes, and every
matrix may spend its share on rank, on width, or on both.

R is then the fraction of those bytes removed (not of their parameters: `--ratio 0.85 --bits 3,4,8` keeps 15% of
the linears' float32 bytes). A matrix at rank r and b bits keeps the predicted loss its top r components avoid, less
the share its quantization error gives back: gain = Σ_{k<r} loss_k · (1 − e_b), e_b the relative output error
measured for quantizing the factor pair (or W, dense) at b bits (quantization/sensitivity.py); it costs its weights'
bits with their scales and zero points as the quantizer stores them (quantization/pricing.py). The same greedy as
the global allocator's, on each matrix's concave hull of (bytes, gain) points, spends the bytes. The widths chosen
travel with the ranks in a `JointAllocation`, and from there to the quantizer as its argument.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SvdllmError
from ..quantization.pricing import FLOAT_BITS, OVERHEAD_BITS, weight_bits
from .budget import MatrixInfo, greedy


@dataclass(frozen=True)
class Widths:
    """The widths a joint allocation chooses among (besides float32), and the quantizer's group size."""

    bits: tuple[int, ...]
    group_size: int = 32

    def __post_init__(self):
        object.__setattr__(self, "bits", tuple(sorted(int(b) for b in self.bits)))

    def record(self) -> dict:
        return {"bits": list(self.bits), "group_size": self.group_size}


@dataclass
class JointAllocation:
    """Every matrix's rank (None: dense) and width (None: float32), and the bytes they take in the quantizer's
    format."""

    ranks: dict[str, int | None]
    bits: dict[str, int | None]
    linear_bytes: int


def parameter_ratio(ratio: float, widths: Widths) -> float:
    """The fraction of parameters removed that leaves the byte budget of `ratio` at the middle width: where the
    global allocator measures its type scales for a joint allocation."""
    middle = widths.bits[len(widths.bits) // 2]
    return min(0.9, max(0.0, 1.0 - (1.0 - ratio) * FLOAT_BITS / (middle + OVERHEAD_BITS / widths.group_size)))


def joint_allocation(matrices: list[MatrixInfo], ratio: float, gains: dict[str, torch.Tensor], spectra: dict,
                     widths: Widths, multiple: int = 1) -> JointAllocation:
    """The ranks and widths of most kept predicted loss within (1 − ratio) of the linears' float32 bytes. `gains`:
    per matrix the cumulative predicted loss its top r components avoid (index r), `spectra` the Spectrum of each
    matrix with its `quant_error` at every width."""
    units = []
    for m in matrices:
        err = spectra[m.name].quant_error
        if not err or any(b not in err for b in widths.bits):
            raise SvdllmError(f"The joint rank-and-bits allocation needs the quantization errors of {m.name} "
                              "(pipeline bug).")
        g = gains[m.name]
        pts = []
        for r in range(multiple, m.dense_rank(multiple) + 1, multiple):
            kept = float(g[min(r, g.numel() - 1)])
            pts.append((m.lowrank_params(r) * FLOAT_BITS, kept, (r, None)))
            for b in widths.bits:
                cost = weight_bits(m.out_features, r, b, widths.group_size) + weight_bits(r, m.in_features, b,
                                                                                          widths.group_size)
                pts.append((cost, kept * (1.0 - err[b][1]), (r, b)))
        kept = float(g[-1])
        pts.append((m.dense_params * FLOAT_BITS, kept, (None, None)))
        for b in widths.bits:
            pts.append((weight_bits(m.out_features, m.in_features, b, widths.group_size), kept * (1.0 - err[b][0]),
                        (None, b)))
        pts.sort(key=lambda p: (p[0], -p[1]))
        units.append(pts)
    target = (1.0 - ratio) * sum(m.dense_params for m in matrices) * FLOAT_BITS
    if sum(u[0][0] for u in units) > target:
        raise SvdllmError(f"R = {ratio} leaves {target / 8 / 2**20:.1f} MiB for the compressed linears, less than "
                          f"their smallest choice at widths {widths.bits} takes; choose a smaller ratio or a lower "
                          "width.")
    chosen = greedy(units, target)
    picks = {m.name: units[u][chosen[u]][2] for u, m in enumerate(matrices)}
    return JointAllocation({name: r for name, (r, _) in picks.items()}, {name: b for name, (_, b) in picks.items()},
                           int(sum(units[u][chosen[u]][0] for u in range(len(units)))) // 8)
