"""What an allocator may read off one decomposition: the spectrum, and with gradient statistics each component's
predicted increase of the model's loss."""
from __future__ import annotations

import math

import torch

from .allocators import Spectrum


def spectrum(weight: torch.Tensor, dec, stats, grads, name: str, bits: tuple = (), group_size: int = 32) -> Spectrum:
    """The Spectrum of W = Σ_k u_k s_k ṽ_kᵀ (`dec`: a factorization.Decomposition, u_k and ṽ_k un-whitened; `stats`:
    the linear's input statistics, `grads`: the model's gradient statistics or None).

    With gradients and inputs, the predicted loss increase of dropping component k is s_k²·(ṽ_kᵀ XᵀX ṽ_k)·(u_kᵀ G u_k):
    the KFAC estimate ½·tr(G·ΔW·XᵀX·ΔWᵀ) of the loss, split over components (up to the constant ½). For the
    truncation-aware methods the ṽ_k are XᵀX-orthonormal, so the split is exact and the middle factor is 1."""
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
    error = quantization_errors(weight, dec, stats.gram, bits, group_size) if bits else None
    return Spectrum(s, loss, grad_norm, float(weight.detach().double().norm()), error)


def quantization_errors(weight: torch.Tensor, dec, gram: torch.Tensor | None, bits: tuple, group_size: int,
                        rows: int = 128) -> dict:
    """bits -> (dense, low-rank) relative output errors ‖ΔW·X‖²/‖W·X‖² of GPTQ at that width, for W and for its
    factor pair at half the largest useful rank (the relative error of a pair barely depends on its rank; the
    joint allocation scales it by the loss each rank keeps). GPTQ quantizes rows independently, so `rows` of them,
    evenly spaced, estimate the error; the Gram's inverse factor is computed once for every width."""
    from ..gptq import Grid, gptq_codes, gptq_low_rank_codes, inverse_factor, output_error
    from ..quantization import _group

    if gram is None:
        raise ValueError("the joint rank-and-bits allocation needs the input Grams")
    g = gram.to(torch.float64)
    factor = inverse_factor(g)
    picked = torch.linspace(0, weight.shape[0] - 1, min(rows, weight.shape[0])).round().long().unique()
    w = weight.detach().to(torch.float64)[picked]
    rank = max(1, dec.left.shape[1] // 2)
    w_u, w_v = dec.factors(rank, torch.float64)
    pair = w_u[picked] @ w_v
    zero = torch.zeros_like(w)
    norm_w, norm_pair = output_error(w, zero, g), output_error(pair, zero, g)
    out = {}
    for b in bits:
        def grid(n: int) -> Grid:  # as svdllm quantize groups a matrix of n inputs (W_u's inputs are the rank)
            return Grid(b, None if b == 8 else _group(n, group_size))

        dense = output_error(w, gptq_codes(w, None, grid(w.shape[1]), factor=factor).dequantized, g)
        q_u, q_v = gptq_low_rank_codes(w_u, w_v, g, grid(w.shape[1]), grid_u=grid(rank), factor=factor, rows=picked)
        low = output_error(pair, q_u.dequantized @ q_v.dequantized, g)
        out[b] = (float(dense / max(norm_w, 1e-300)), float(low / max(norm_pair, 1e-300)))
    return out
