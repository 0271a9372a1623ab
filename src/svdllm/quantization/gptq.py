"""Error-feedback quantization (GPTQ, Frantar et al. 2023) of a weight matrix, given the Hessian of its layer-wise
loss ‖(W − Q)X‖² : H = XᵀX, the input Gram that svdllm's calibration already keeps.

Columns are quantized one at a time; the error each one leaves, divided by the pivot of H⁻¹, is pushed onto the
columns not yet quantized through the matching row of H⁻¹, so that those columns absorb what the input correlations
let them absorb. With the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) the rows of U are exactly the rows of the
successive Schur-complemented inverses, so no inverse is updated in the loop (the "Cholesky form"); blocks of
columns defer the update of the columns after them to one matrix product.

The columns go in decreasing H_ii ("act-order"): the inputs with the most energy are quantized first, while the
most columns remain to absorb their error. Each group's grid is fixed before the loop from the weights as they
are ("static groups"), so a group stays a contiguous range of inputs, the layout every runtime stores, whatever
the order. On SmolLM2's own weights and Grams, act-order leaves 17% less output error at int4 than the columns in
order, and the clipping search on the grid (`Grid.clip`) 5% less again (benchmarks/quantization/gptq_variants.py; BENCHMARKS.md,
"Error feedback").

For a low-rank pair W ≈ W_u·W_v with input Gram G = XᵀX: W_v's Hessian is G, and W_u's is Q_v·G·Q_vᵀ, W_v's own
quantized value feeding it, so W_u also corrects what quantizing W_v did. The pair is first moved to another basis
of its rank (`gauge`), which leaves the product as it is and the factors far easier to quantize.

The grid is min-max with a zero point (asymmetric), one scale per output row and group of `group_size` input
columns (None: the whole row); with `clip`, the range is shrunk by the factor in [0.5, 1] that leaves the least
squared error on the group's weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class Grid:
    bits: int = 4
    group_size: int | None = 128  # input columns sharing a scale and zero point (None: one per output row)
    clip: bool = False  # search each row's and group's range instead of taking min-max (GPTQ's callers do)

    @property
    def levels(self) -> int:
        return 2**self.bits - 1


class Quantized(NamedTuple):
    """A matrix on its grid: W ≈ scale·(codes − zero), per row and group of columns."""

    dequantized: torch.Tensor  # m × n, float64
    codes: torch.Tensor  # m × n, integers in [0, 2^bits − 1] (int16)
    scale: torch.Tensor  # m × groups, float64
    zero: torch.Tensor  # m × groups, integers in [0, 2^bits − 1] (float64)


def grid_params(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each m × 1, of the grid of the columns `w` (m × g); the range always holds 0. Min-max, or
    with `grid.clip` the min-max range shrunk by the factor of least squared error, row by row."""
    lo = w.min(dim=1, keepdim=True).values.clamp(max=0)
    hi = w.max(dim=1, keepdim=True).values.clamp(min=0)
    scale, zero = _range_params(lo, hi, grid)
    if not grid.clip:
        return scale, zero
    best = ((fake_quantize(w, scale, zero, grid) - w) ** 2).sum(dim=1, keepdim=True)
    for shrink in torch.linspace(1, 0.5, CLIP_STEPS, dtype=w.dtype)[1:]:
        s, z = _range_params(lo * shrink, hi * shrink, grid)
        err = ((fake_quantize(w, s, z, grid) - w) ** 2).sum(dim=1, keepdim=True)
        better = err < best
        best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


CLIP_STEPS = 20


def _range_params(lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (hi - lo) / grid.levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale reproduces it
    return scale, torch.round(-lo / scale)


def codes_of(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, grid.levels)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    return scale * (codes_of(w, scale, zero, grid) - zero)


def _groups(n: int, grid: Grid) -> int:
    return n if grid.group_size is None else grid.group_size


def rtn(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Round-to-nearest on the same grid (the baseline GPTQ improves on)."""
    return rtn_codes(w, grid).dequantized


def rtn_codes(w: torch.Tensor, grid: Grid) -> Quantized:
    w = w.to(torch.float64)
    out, codes = torch.empty_like(w), torch.empty(w.shape, dtype=torch.int16)
    g = _groups(w.shape[1], grid)
    scales, zeros = [], []
    for s in range(0, w.shape[1], g):
        scale, zero = grid_params(w[:, s : s + g], grid)
        c = codes_of(w[:, s : s + g], scale, zero, grid)
        codes[:, s : s + g], out[:, s : s + g] = c.to(torch.int16), scale * (c - zero)
        scales.append(scale)
        zeros.append(zero)
    return Quantized(out, codes, torch.cat(scales, dim=1), torch.cat(zeros, dim=1))


def damped(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H + λI with λ = damp·mean(diag H), dead inputs (H_ii = 0) given a unit pivot; and the mask of dead inputs."""
    h = h.to(torch.float64).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    return h, dead


def gptq(w: torch.Tensor, h: torch.Tensor, grid: Grid, damp: float = 0.01, block: int = 128,
         act_order: bool = True) -> torch.Tensor:
    """W (m × n) quantized on `grid` with error feedback through H (n × n): the dequantized matrix in float64."""
    return gptq_codes(w, h, grid, damp, block, act_order=act_order).dequantized


class InverseFactor(NamedTuple):
    """What the column loop reads of one Hessian, shared by every matrix and grid quantized on it."""

    u: torch.Tensor  # the upper Cholesky factor of (H + λI)⁻¹ with rows and columns in `order`
    dead: torch.Tensor  # inputs that never carry a signal (H_ii = 0)
    order: torch.Tensor  # the order the columns are quantized in


def inverse_factor(h: torch.Tensor, damp: float = 0.01, act_order: bool = True) -> InverseFactor:
    h, dead = damped(h, damp)
    n = h.shape[0]
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(n, device=h.device)
    h = h[order][:, order]
    return InverseFactor(torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True), dead,
                         order)


@torch.no_grad()
def gptq_codes(w: torch.Tensor, h: torch.Tensor | None, grid: Grid, damp: float = 0.01, block: int = 128,
               factor: InverseFactor | None = None, act_order: bool = True) -> Quantized:
    """W (m × n) quantized on `grid` with error feedback through H (n × n), or through `factor`, H's
    inverse_factor computed once (its order then rules, not `act_order`)."""
    w = w.to(torch.float64).clone()
    u, dead, order = factor if factor is not None else inverse_factor(h, damp, act_order)
    w[:, dead] = 0  # inputs that never carry a signal: their weights cost nothing to drop
    n = w.shape[1]
    g = _groups(n, grid)
    grids = [grid_params(w[:, s : s + g], grid) for s in range(0, n, g)]  # static groups, from W as it is
    scale, zero = torch.cat([p[0] for p in grids], dim=1), torch.cat([p[1] for p in grids], dim=1)
    group = (order // g)  # the group of each column, in the order of the loop
    col_scale, col_zero = scale[:, group], zero[:, group]
    w = w[:, order]
    q, codes = torch.empty_like(w), torch.empty_like(w)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb, ub = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        err = torch.empty_like(wb)
        for i in range(b1 - b0):
            s, z = col_scale[:, b0 + i : b0 + i + 1], col_zero[:, b0 + i : b0 + i + 1]
            c = codes_of(wb[:, i : i + 1], s, z, grid)
            codes[:, b0 + i : b0 + i + 1] = c
            qi = s * (c - z)
            q[:, b0 + i : b0 + i + 1] = qi
            e = (wb[:, i : i + 1] - qi) / ub[i, i]
            wb[:, i:] -= e @ ub[i : i + 1, i:]
            err[:, i : i + 1] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    back = torch.argsort(order)
    return Quantized(q[:, back], codes[:, back].to(torch.int16), scale, zero)


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W − Q)·H·(W − Q)ᵀ) = ‖(W − Q)X‖²_F: what quantizing W costs on the calibration inputs."""
    d = w.detach().to(torch.float64) - q.detach().to(torch.float64)
    return float(((d @ h.to(torch.float64)) * d).sum())


@torch.no_grad()
def gptq_low_rank(w_u: torch.Tensor, w_v: torch.Tensor, gram: torch.Tensor, grid: Grid, damp: float = 0.01,
                  rebase: bool = True):
    """(Q_u, Q_v) of a factor pair with input Gram G: W_v quantized on G; then W_u refitted to the quantized W_v,
    T = W_u·W_v·G·Q_vᵀ·(Q_v·G·Q_vᵀ)⁻¹ (least squares: T·Q_v·X closest to W_u·W_v·X), and T quantized on its real
    input's Hessian Q_v·G·Q_vᵀ. ‖W_u·W_v·X − Q_u·Q_v·X‖² is then the refit's residual plus ‖(T − Q_u)·Q_v·X‖²,
    the part GPTQ minimizes: W_u takes up what quantizing W_v lost, as far as its rank allows."""
    q_u, q_v = gptq_low_rank_codes(w_u, w_v, gram, grid, damp, rebase=rebase)
    return q_u.dequantized, q_v.dequantized


@torch.no_grad()
def gauge(w_u: torch.Tensor, w_v: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_u·A⁻¹, A·W_v) with A = Rᵀ·D: the same product in another basis of the rank, one that quantizes better.

    A truncated SVD leaves the rank components decorrelated: W_v·X's rows are near orthogonal, so W_u's Hessian
    W_v·G·W_vᵀ is near diagonal and GPTQ has nowhere to push W_u's rounding error (on a diagonal Hessian it is
    round-to-nearest), while the split puts every scale on one side (kfac-svd's W_u is 10⁵ times its W_v). D gives
    each component's two halves equal norms; R, a fixed random rotation, mixes the components, so that W_u's
    Hessian has off-diagonal mass and no column of W_u stands out in its group (QuIP's incoherence). On the default
    model's factor pairs at R = 0.4 this leaves 45% less output error at int4 (benchmarks/quantization/factor_quant_error.py)."""
    w_u, w_v = w_u.to(torch.float64), w_v.to(torch.float64)
    d = (w_u.norm(dim=0).clamp_min(1e-30) / w_v.norm(dim=1).clamp_min(1e-30)).sqrt()
    r = torch.linalg.qr(torch.randn(w_v.shape[0], w_v.shape[0], dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(seed)))[0]
    return (w_u / d) @ r, r.T @ (w_v * d[:, None])


@torch.no_grad()
def gptq_low_rank_codes(w_u, w_v, gram, grid: Grid, damp: float = 0.01, grid_u: Grid | None = None,
                        factor: tuple | None = None, rows: torch.Tensor | None = None, rebase: bool = True):
    """gptq_low_rank with the codes: (Quantized W_u, Quantized W_v), of the pair in the basis of `gauge` unless
    `rebase` is False; `grid_u` for W_u if its grid differs, `factor` the Gram's inverse_factor if at hand, `rows`:
    only those rows of W_u (an estimate of the error, rows being quantized independently)."""
    g = gram.to(torch.float64)
    w_u, w_v = w_u.to(torch.float64), w_v.to(torch.float64)
    if rebase:
        w_u, w_v = gauge(w_u, w_v)
    if rows is not None:
        w_u = w_u[rows]
    q_v = gptq_codes(w_v, g, grid, damp, factor=factor)
    d = q_v.dequantized
    h_u = d @ g @ d.T
    target = torch.linalg.solve(damped(h_u, 1e-10)[0], (w_u @ (w_v @ g @ d.T)).T).T  # (h_u symmetric)
    return gptq_codes(target, h_u, grid_u or grid, damp), q_v
