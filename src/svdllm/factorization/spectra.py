"""The spectra phase: every matrix decomposed once, on the dense model's statistics; its spectrum goes to the
allocator and the decomposition to the store, where the allocation's measurements and the factorization find it."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocation.spectra import spectrum
from ..calibration import distributed, linear_stats
from ..errors import SvdllmError
from ..quantization.gptq import inverse_factor
from ..quantization.sensitivity import quantization_errors
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
