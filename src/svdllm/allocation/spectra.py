"""What an allocator may read off one decomposition: the spectrum, and with gradient statistics each component's
predicted increase of the model's loss."""
from __future__ import annotations

import math

import torch

from .allocators import Spectrum


def spectrum(weight: torch.Tensor, dec, stats, grads, name: str, quant_error: dict | None = None) -> Spectrum:
    """The Spectrum of W = Σ_k u_k s_k ṽ_kᵀ (`dec`: a factorization.Decomposition, u_k and ṽ_k un-whitened; `stats`:
    the linear's input statistics, `grads`: the model's gradient statistics or None).

    With gradients and inputs, the predicted loss increase of dropping component k is s_k²·(ṽ_kᵀ XᵀX ṽ_k)·(u_kᵀ G u_k):
    the KFAC estimate ½·tr(G·ΔW·XᵀX·ΔWᵀ) of the loss, split over components (up to the constant ½). For the
    truncation-aware methods the ṽ_k are XᵀX-orthonormal, so the split is exact and the middle factor is 1.
    `quant_error`: the matrix's quantization errors for a joint rank-and-bits allocation (factorization/spectra.py)."""
    s = dec.s.detach().to(torch.float64).cpu()
    loss = grad_norm = None
    if grads is not None:
        grad_norm = math.sqrt(float(grads.rows[name].sum()) / max(grads.windows, 1))
        if dec.info.get("kfac_loss"):  # two-sided whitening: s_k² already is the component's KFAC loss, full G
            loss = s.pow(2)
        elif stats.gram is not None:
            right, left = dec.right.to(torch.float64), dec.left.to(torch.float64)
            in_energy = ((right @ stats.gram.to(torch.float64)) * right).sum(1)
            out_weight = (left.pow(2) * grads.outputs[name].to(torch.float64)[:, None]).sum(0)
            loss = (s.pow(2) * in_energy.cpu() * out_weight.cpu()).clamp_min(0)
    return Spectrum(s, loss, grad_norm, float(weight.detach().double().norm()), quant_error)
