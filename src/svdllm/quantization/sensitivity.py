"""How much a matrix loses to quantization, for the joint rank-and-bits allocation: the relative output error GPTQ
leaves at each width, on the dense weight and on a factor pair of it."""
from __future__ import annotations

import torch

from .gptq import Grid, gptq_codes, gptq_low_rank_codes, inverse_factor, output_error
from .pricing import quant_group


def quantization_errors(weight: torch.Tensor, dec, gram: torch.Tensor | None, bits: tuple, group_size: int,
                        rows: int = 128, usable: int | None = None, factor: tuple | None = None) -> dict:
    """bits -> (dense, low-rank) relative output errors ‖ΔW·X‖²/‖W·X‖² of GPTQ at that width, for W and for its
    factor pair at half the `usable` rank, the largest at which a pair is smaller than W (the relative error of a
    pair barely depends on its rank; the joint allocation scales it by the loss each rank keeps). GPTQ quantizes
    rows independently, so `rows` of them, evenly spaced, estimate the error; the Gram's inverse factor (`factor`,
    gptq.inverse_factor of the Gram, when the caller shares it between matrices) serves every width."""
    if gram is None:
        raise ValueError("the joint rank-and-bits allocation needs the input Grams")
    g = gram.to(torch.float64)
    factor = factor if factor is not None else inverse_factor(g)
    picked = torch.linspace(0, weight.shape[0] - 1, min(rows, weight.shape[0])).round().long().unique()
    w = weight.detach().to(torch.float64)[picked]
    rank = max(1, min(dec.left.shape[1], usable or dec.left.shape[1]) // 2)
    w_u, w_v = dec.factors(rank, torch.float64)
    pair = w_u[picked] @ w_v
    zero = torch.zeros_like(w)
    norm_w, norm_pair = output_error(w, zero, g), output_error(pair, zero, g)
    out = {}
    for b in bits:
        def grid(n: int) -> Grid:  # as svdllm quantize groups a matrix of n inputs (W_u's inputs are the rank)
            return Grid(b, None if b == 8 else quant_group(n, group_size), clip=True)

        dense = output_error(w, gptq_codes(w, None, grid(w.shape[1]), factor=factor).dequantized, g)
        q_u, q_v = gptq_low_rank_codes(w_u, w_v, g, grid(w.shape[1]), grid_u=grid(rank), factor=factor, rows=picked)
        low = output_error(pair, q_u.dequantized @ q_v.dequantized, g)
        out[b] = (float(dense / max(norm_w, 1e-300)), float(low / max(norm_pair, 1e-300)))
    return out
