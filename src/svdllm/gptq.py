"""Error-feedback quantization (GPTQ, Frantar et al. 2023) of a weight matrix, given the Hessian of its layer-wise
loss ‖(W − Q)X‖² : H = XᵀX, the input Gram that svdllm's calibration already keeps.

Columns are quantized one at a time, in order; the error each one leaves, divided by the pivot of H⁻¹, is pushed
onto the columns not yet quantized through the matching row of H⁻¹, so that those columns absorb what the input
correlations let them absorb. With the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) the rows of U are exactly the
rows of the successive Schur-complemented inverses, so no inverse is updated in the loop (the "Cholesky form");
blocks of columns defer the update of the columns after them to one matrix product.

For a low-rank pair W ≈ W_u·W_v with input Gram G = XᵀX: W_v's Hessian is G, and W_u's is Q_v·G·Q_vᵀ, W_v's own
quantized value feeding it, so W_u also corrects what quantizing W_v did.

The grid is min-max with a zero point (asymmetric), one scale per output row and group of `group_size` input
columns (None: the whole row), computed when the loop reaches the group's first column, from the columns as the
earlier errors have left them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class Grid:
    bits: int = 4
    group_size: int | None = 128  # input columns sharing a scale and zero point (None: one per output row)

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
    """(scale, zero), each m × 1, of the min-max grid of the columns `w` (m × g); the range always holds 0."""
    lo = w.min(dim=1, keepdim=True).values.clamp(max=0)
    hi = w.max(dim=1, keepdim=True).values.clamp(min=0)
    scale = (hi - lo) / grid.levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale reproduces it
    zero = torch.round(-lo / scale)
    return scale, zero


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


def gptq(w: torch.Tensor, h: torch.Tensor, grid: Grid, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """W (m × n) quantized on `grid` with error feedback through H (n × n): the dequantized matrix in float64."""
    return gptq_codes(w, h, grid, damp, block).dequantized


def inverse_factor(h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): the upper Cholesky factor of (H + λI)⁻¹ that the column loop reads, and the dead inputs; one per
    Hessian, for every matrix and grid quantized on it."""
    h, dead = damped(h, damp)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True), dead


@torch.no_grad()
def gptq_codes(w: torch.Tensor, h: torch.Tensor | None, grid: Grid, damp: float = 0.01, block: int = 128,
               factor: tuple | None = None) -> Quantized:
    """W (m × n) quantized on `grid` with error feedback through H (n × n), or through `factor`, H's
    inverse_factor computed once. `block` is rounded to a multiple of the group size, so that every group is
    quantized from up-to-date columns."""
    w = w.to(torch.float64).clone()
    u, dead = factor if factor is not None else inverse_factor(h, damp)
    w[:, dead] = 0  # inputs that never carry a signal: their weights cost nothing to drop
    n = w.shape[1]
    g = _groups(n, grid)
    block = max(g, block // g * g) if grid.group_size is not None else block
    q, codes = torch.empty_like(w), torch.empty(w.shape, dtype=torch.int16)
    scales, zeros = [], []
    scale, zero = grid_params(w, grid)  # the per-row grid (group_size None); groups get theirs in the loop
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb, ub = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        err = torch.empty_like(wb)
        for i in range(b1 - b0):
            col = b0 + i
            if col % g == 0:
                if grid.group_size is not None:
                    scale, zero = grid_params(wb[:, i : i + g], grid)
                scales.append(scale)
                zeros.append(zero)
            c = codes_of(wb[:, i : i + 1], scale, zero, grid)
            codes[:, col : col + 1] = c.to(torch.int16)
            qi = scale * (c - zero)
            q[:, col : col + 1] = qi
            e = (wb[:, i : i + 1] - qi) / ub[i, i]
            wb[:, i:] -= e @ ub[i : i + 1, i:]
            err[:, i : i + 1] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return Quantized(q, codes, torch.cat(scales, dim=1), torch.cat(zeros, dim=1))


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W − Q)·H·(W − Q)ᵀ) = ‖(W − Q)X‖²_F: what quantizing W costs on the calibration inputs."""
    d = w.detach().to(torch.float64) - q.detach().to(torch.float64)
    return float(((d @ h.to(torch.float64)) * d).sum())


@torch.no_grad()
def gptq_low_rank(w_u: torch.Tensor, w_v: torch.Tensor, gram: torch.Tensor, grid: Grid, damp: float = 0.01):
    """(Q_u, Q_v) of a factor pair with input Gram G: W_v quantized on G; then W_u refitted to the quantized W_v,
    T = W_u·W_v·G·Q_vᵀ·(Q_v·G·Q_vᵀ)⁻¹ (least squares: T·Q_v·X closest to W_u·W_v·X), and T quantized on its real
    input's Hessian Q_v·G·Q_vᵀ. ‖W_u·W_v·X − Q_u·Q_v·X‖² is then the refit's residual plus ‖(T − Q_u)·Q_v·X‖²,
    the part GPTQ minimizes: W_u takes up what quantizing W_v lost, as far as its rank allows."""
    q_u, q_v = gptq_low_rank_codes(w_u, w_v, gram, grid, damp)
    return q_u.dequantized, q_v.dequantized


@torch.no_grad()
def gptq_low_rank_codes(w_u, w_v, gram, grid: Grid, damp: float = 0.01, grid_u: Grid | None = None,
                        factor: tuple | None = None, rows: torch.Tensor | None = None):
    """gptq_low_rank with the codes: (Quantized W_u, Quantized W_v); `grid_u` for W_u if its grid differs, `factor`
    the Gram's inverse_factor if at hand, `rows`: only those rows of W_u (an estimate of the error, rows being
    quantized independently)."""
    g = gram.to(torch.float64)
    w_u, w_v = w_u.to(torch.float64), w_v.to(torch.float64)
    if rows is not None:
        w_u = w_u[rows]
    q_v = gptq_codes(w_v, g, grid, damp, factor=factor)
    d = q_v.dequantized
    h_u = d @ g @ d.T
    target = torch.linalg.solve(damped(h_u, 1e-10)[0], (w_u @ (w_v @ g @ d.T)).T).T  # (h_u symmetric)
    return gptq_codes(target, h_u, grid_u or grid, damp), q_v
