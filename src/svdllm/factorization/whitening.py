"""Truncation-aware whitening (SVD-LLM §3.1): S with S·Sᵀ = XᵀX, so that S⁻¹X has orthonormal rows and the
loss ‖(W − W′)X‖_F of truncating SVD(W·S) equals the root-sum-square of the discarded singular values."""
from __future__ import annotations

import torch

MAX_JITTER_TRIES = 8


def symmetrized(gram: torch.Tensor) -> torch.Tensor:
    """(G + Gᵀ)/2 in float64, checked finite; one n × n temporary at most (the Grams of a 7B MLP are 1.6 GB)."""
    g = gram.to(torch.float64)
    g = g + g.T
    g.div_(2)
    if not torch.isfinite(g).all():
        raise ValueError("the Gram matrix XᵀX contains NaN or inf")
    return g


def cholesky_whitening(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower-triangular S with S·Sᵀ = XᵀX (+ jitter·I), in float64, and the jitter that was needed.

    Fallback when XᵀX is not positive definite (dead input channels, fewer tokens than channels, rounding):
    add jitter·I with jitter = 10⁻⁶·mean(diag XᵀX), ×10 per retry, until the Cholesky factorization succeeds.
    (The SVD-LLM release shifts by −λ_min instead; a Gram matrix of real activations is positive semi-definite,
    so its λ_min is only rounding noise, and the geometric search needs no eigendecomposition.) The loss identity
    then holds for the shifted Gram, which differs from the true one only along directions the data barely excites.
    """
    g = symmetrized(gram)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return chol, 0.0
    scale = float(g.diagonal().mean().clamp_min(1e-30))
    for k in range(MAX_JITTER_TRIES):
        jitter = scale * 1e-6 * 10**k
        shifted = g.clone()
        shifted.diagonal().add_(jitter)  # g + jitter·I without an n × n identity
        chol, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        if int(info) == 0:
            return chol, jitter
    raise ValueError("XᵀX is far from positive semi-definite: it cannot come from real activations")


def eigen_whitening(gram: torch.Tensor, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM V2's whitening by an eigendecomposition: XᵀX = QΛQᵀ, S = QΛ^½, and the pseudo-inverse S⁺.

    Eigenvalues below rtol·λ_max (default n·eps) are directions the data never excites: S⁺ maps them to zero,
    which leaves ‖(W − W′)X‖_F unchanged (X has no component there), so a singular XᵀX needs no jitter.
    """
    g = symmetrized(gram)
    lam, q = torch.linalg.eigh(g)
    rtol = g.shape[0] * torch.finfo(torch.float64).eps if rtol is None else rtol
    keep = lam > rtol * lam.max().clamp_min(1e-300)
    root = lam.clamp_min(0).sqrt() * keep
    inv_root = torch.where(keep, 1.0 / lam.clamp_min(1e-300).sqrt(), torch.zeros_like(lam))
    return q * root, inv_root[:, None] * q.T
