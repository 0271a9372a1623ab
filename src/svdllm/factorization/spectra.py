"""The spectra phase: every matrix decomposed once, on the dense model's statistics; its spectrum goes to the
allocator and the decomposition to the store, where the allocation's measurements and the factorization find it."""
from __future__ import annotations

import torch
from torch import nn

from ..allocation.spectra import spectrum
from ..calibration import distributed, linear_stats
from ..calibration.walk import LayerProcessor, Step, Walk
from ..errors import SvdllmError
from ..quantization.gptq import inverse_factor
from ..quantization.sensitivity import quantization_errors
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


class Spectra(LayerProcessor):
    """The spectra phase, a processor of a walk without windows: every matrix of each layer decomposed on its
    statistics (`stats_of(i)`, or None), its spectrum kept for the allocator and the decomposition put in the store.
    With `bits`, each Spectrum also holds the quantization errors at those widths (the joint allocation)."""

    desc = "spectra"

    def __init__(self, method: Method, stats_of, grads, store: DecompositionStore | None, bits: tuple = (),
                 group_size: int = 32):
        self.method, self.stats_of, self.grads, self.store = method, stats_of, grads, store
        self.bits, self.group_size = bits, group_size
        self.out = {}

    def layer(self, step: Step) -> None:
        family, linears = step.family, step.family.linear_names
        stats = self.stats_of(step.i)
        factors = {}  # GPTQ's inverse factor, one per input group (q/k/v share a Gram, as do gate/up)
        for k, name in enumerate(linears):
            if not distributed.mine(step.i * len(linears) + k):  # round-robin across ranks (torchrun)
                continue
            full = family.linear_name(step.i, name)
            lin = step.layer.get_submodule(name)
            one = linear_stats(stats, self.grads, full, family.group_of[name])
            dec = decompose(self.method, full, lin, one)
            error = None
            if self.bits:
                group = family.group_of[name]
                if group not in factors and one.gram is not None:
                    factors[group] = inverse_factor(one.gram.to(torch.float64))
                error = quantization_errors(lin.weight, dec, one.gram, self.bits, self.group_size,
                                            usable=usable_rank(lin), factor=factors.get(group))
            self.out[full] = spectrum(lin.weight, dec, one, self.grads, full, error)
            if self.store is not None:
                self.store.put(full, dec, usable_rank(lin))

    def finish(self, walk: Walk) -> dict:
        return distributed.gather_merge(self.out)


def spectra(model: nn.Module, method: Method, stats_of, grads, store: DecompositionStore | None,
            progress: bool = True, bits: tuple = (), group_size: int = 32) -> dict:
    """name -> Spectrum for every compressible linear (the Spectra processor over every layer)."""
    return Walk(model, progress=progress).run(Spectra(method, stats_of, grads, store, bits, group_size))
