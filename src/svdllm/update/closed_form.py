"""SVD-LLM's closed-form parameter update, from the moments of the inputs the linear really receives."""
from __future__ import annotations

import torch


def closed_form_w_u(weight: torch.Tensor, w_v: torch.Tensor, gram_compressed: torch.Tensor,
                    cross: torch.Tensor | None = None) -> torch.Tensor:
    """argmin over W_u of ‖W·X − W_u·W_v·X′‖_F (columns = tokens), from the moments X′ᵀX′ and XᵀX′ (rows = tokens);
    without `cross` the target is the dense weight on the same inputs, W·X′ (X = X′).

    Normal equations: W_u·(W_v X′ᵀX′ W_vᵀ) = W·(XᵀX′)·W_vᵀ. The r × r system is solved by Cholesky, with a ridge
    of 10⁻¹⁰·mean(diag) (×10 per retry) if W_v·X′ is rank-deficient on the calibration data.
    """
    w, v = weight.to(torch.float64), w_v.to(torch.float64)
    gram_compressed = gram_compressed.to(torch.float64)
    a = v @ gram_compressed @ v.T
    a = (a + a.T) / 2
    b = w @ (gram_compressed if cross is None else cross.to(torch.float64)) @ v.T
    scale = float(a.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    for k in range(-1, 10):
        chol, info = torch.linalg.cholesky_ex(a if k < 0 else a + scale * 1e-10 * 10**k * eye)
        if int(info) == 0:
            return torch.cholesky_solve(b.T, chol).T
    raise ValueError("the closed-form update's normal equations could not be solved")


def output_error(w, w_u, w_v, stats) -> float:
    """‖W·X − W_u·W_v·X′‖_F² from the moments, without the activations:
    tr(W XᵀX Wᵀ) − 2 tr(W XᵀX′ (W_u W_v)ᵀ) + tr(W_u W_v X′ᵀX′ (W_u W_v)ᵀ)."""
    wp = w_u @ w_v
    if stats.cross is None:  # the target is W·X′
        d = w - wp
        return float(((d @ stats.gram_compressed) * d).sum())
    return float(((w @ stats.gram) * w).sum() - 2 * ((w @ stats.cross) * wp).sum()
                 + ((wp @ stats.gram_compressed) * wp).sum())
