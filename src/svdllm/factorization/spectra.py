"""The spectra phase: every matrix decomposed once, on the dense model's statistics; its spectrum goes to the
allocator and the decomposition to the store, where the allocation's measurements and the factorization find it."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocation.spectra import spectrum
from ..calibration import distributed, linear_stats
from ..errors import SvdllmError
from ..gptq import inverse_factor
from ..models.families import family_of
from ..models.lazy import resident
from .base import Decomposition, Method
from .store import DecompositionStore


def decompose(method: Method, full: str, lin: nn.Module, stats) -> Decomposition:
    """`method`'s decomposition of linear `full` (float64), with the damage named if the weight or the method fails."""
    if not torch.isfinite(lin.weight).all():
        raise SvdllmError(f"The weight of {full} contains NaN or inf: the checkpoint is damaged.")
    try:
        return method.decompose(lin.weight.detach().to(torch.float64), stats)
    except ValueError as e:
        raise SvdllmError(f"Factorizing {full} failed: {e}") from e


def usable_rank(lin: nn.Module) -> int:
    """The largest rank at which a factor pair is still smaller than the dense matrix: no allocation goes beyond."""
    m, n = lin.weight.shape
    return (m * n - 1) // (m + n)


def spectra(model: nn.Module, method: Method, stats_of, grads, store: DecompositionStore | None,
            progress: bool = True, bits: tuple = (), group_size: int = 32) -> dict:
    """name -> Spectrum for every compressible linear; `stats_of(i)` gives layer i's input statistics (or None).
    With `bits`, each Spectrum also holds the quantization errors at those widths (the joint allocation)."""
    out = {}
    family = family_of(model)
    linears = family.linear_names
    for i, layer in enumerate(tqdm(family.decoder_layers(model), desc="spectra", unit="layer", disable=not progress)):
        stats = stats_of(i)
        factors = {}  # GPTQ's inverse factor, one per input group (q/k/v share a Gram, as do gate/up)
        with resident(model, i):
            for k, name in enumerate(linears):
                if not distributed.mine(i * len(linears) + k):  # round-robin across ranks (torchrun)
                    continue
                full = family.linear_name(i, name)
                lin = layer.get_submodule(name)
                one = linear_stats(stats, grads, full, family.group_of[name])
                dec = decompose(method, full, lin, one)
                error = None
                if bits:
                    group = family.group_of[name]
                    if group not in factors and one.gram is not None:
                        factors[group] = inverse_factor(one.gram.to(torch.float64))
                    error = quantization_errors(lin.weight, dec, one.gram, bits, group_size, usable=usable_rank(lin),
                                                factor=factors.get(group))
                out[full] = spectrum(lin.weight, dec, one, grads, full, error)
                if store is not None:
                    store.put(full, dec, usable_rank(lin))
    return distributed.gather_merge(out)


def quantization_errors(weight: torch.Tensor, dec, gram: torch.Tensor | None, bits: tuple, group_size: int,
                        rows: int = 128, usable: int | None = None, factor: tuple | None = None) -> dict:
    """bits -> (dense, low-rank) relative output errors ‖ΔW·X‖²/‖W·X‖² of GPTQ at that width, for W and for its
    factor pair at half the `usable` rank, the largest at which a pair is smaller than W (the relative error of a
    pair barely depends on its rank; the joint allocation scales it by the loss each rank keeps). GPTQ quantizes
    rows independently, so `rows` of them, evenly spaced, estimate the error; the Gram's inverse factor (`factor`,
    gptq.inverse_factor of the Gram, when the caller shares it between matrices) serves every width."""
    from ..allocation.budget import quant_group
    from ..gptq import Grid, gptq_codes, gptq_low_rank_codes, output_error

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
