"""The factorization phase: each decoder layer's matrices turned into factor pairs for every ratio of the run,
as the layer loop reaches the layer, with the closed-form update where asked.

The decomposition comes from the spectra phase's store when that phase ran on the same statistics (read back, not
recomputed); otherwise the method decomposes the matrix here. With the closed-form update, or in the sequential
calibration mode, each layer's factors are swapped into the model as soon as they exist, so that the layers after
it are calibrated on the compressed model's activations.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from ..calibration import distributed, linear_stats
from ..calibration.walk import LayerProcessor, Step
from ..errors import SvdllmError
from ..nn.low_rank import swap_in
from ..models.families import family_of
from ..models.lazy import resident_bytes
from .base import Method
from .spectra import decompose
from .store import DecompositionStore


class LayerFactorizer:
    """What the factorization phase accumulates: per ratio the factors and truncation losses of every matrix, the
    whitening jitters, the closed-form update's error reductions, and the dense modules swapped out."""

    def __init__(self, model: nn.Module, method: Method, ratios: list[float], ranks: dict, grads,
                 store: DecompositionStore | None, refit, sequential_mode: bool, timings: dict,
                 writers: dict | None = None, partial=None):
        """`refit(weight, w_u, w_v, stats) -> (w_u, gain)`: the parameter update applied to each factor pair (the
        closed form, update/closed_form.py), or None."""
        self.model, self.method, self.ratios, self.ranks, self.grads = model, method, ratios, ranks, grads
        self.refit, self.closed_form, self.sequential_mode = refit, refit is not None, sequential_mode
        # the store holds decompositions made on the dense model's statistics; the sequential mode whitens on others
        self.store = None if sequential_mode else store
        self.sequential = sequential_mode or self.closed_form  # each layer is swapped in as soon as it is done
        self.timings, self.writers, self.partial = timings, writers or {}, partial
        self.factors: dict[float, dict] = {r: {} for r in ratios}
        self.losses: dict[float, dict] = {r: {} for r in ratios}
        self.jitters: dict[str, float] = {}
        self.update_gain: dict[str, float] = {}
        self.applied: dict[str, nn.Module] = {}
        self.family = family_of(model)

    def _one(self, full: str, name: str, lin: nn.Module, stats) -> dict:
        """Every ratio's factors of one matrix, and what the manifest records about it."""
        one = linear_stats(stats, self.grads, full, self.family.group_of[name])
        whiten = one
        if self.closed_form and self.sequential_mode:  # whiten on the compressed model's own inputs
            whiten = dataclasses.replace(one, gram=one.gram_compressed)
        dec = self.store.get(full, lin.weight.device) if self.store is not None else None
        if dec is None:
            dec = decompose(self.method, full, lin, whiten)
        out = {"jitter": dec.info.get("whitening_jitter"), "factors": {}, "losses": {}, "gain": None}
        for r in self.ratios:
            rank = self.ranks[r][full]
            if rank is None:
                continue
            w_u, w_v = dec.factors(rank, dtype=torch.float64)
            if self.refit is not None:
                w_u, out["gain"] = self.refit(lin.weight, w_u, w_v, one)
            out["factors"][r] = (w_u.to(lin.weight.dtype).contiguous(), w_v.to(lin.weight.dtype).contiguous())
            out["losses"][r] = dec.truncation_loss(rank)
        return out

    def layer(self, i: int, layer: nn.Module, stats, names: tuple[str, ...] | None = None) -> None:
        """Factorize `names` of layer i (all its linears by default; with the closed-form update, one input group at
        a time); in a sequential pass they replace the dense linears in the model at once."""
        t = time.perf_counter()
        linears = self.family.linear_names
        names = names or linears
        prefix = self.family.layer_prefix(i)
        # under torchrun each rank factorizes every world_size-th matrix; the results are gathered on all ranks
        done = distributed.gather_merge({
            prefix + name: self._one(prefix + name, name, layer.get_submodule(name), stats)
            for k, name in enumerate(linears) if name in names and distributed.mine(i * len(linears) + k)})
        for full in (prefix + name for name in names):
            one = done[full]
            if one["jitter"]:
                self.jitters[full] = one["jitter"]
            if one["gain"] is not None:
                self.update_gain[full] = one["gain"]
            for r, pair in one["factors"].items():
                self.factors[r][full] = pair
                self.losses[r][full] = one["losses"][r]
        self.timings["factorization_s"] += time.perf_counter() - t
        first = self.factors[self.ratios[0]]
        if self.sequential:
            self.applied.update(swap_in(self.model, {prefix + n: first[prefix + n] for n in names if prefix + n in first}))
        if names[-1] != linears[-1]:  # the closed-form update: more groups of this layer to come
            return
        if self.partial is not None:  # the layer is finished: an interrupted pass resumes after it
            here = {k: v for k, v in first.items() if k.startswith(prefix)}
            self.partial.save(i, here, {"loss": {k: self.losses[self.ratios[0]][k] for k in here},
                                        "gain": {k: self.update_gain[k] for k in here if k in self.update_gain},
                                        "jitter": {k: self.jitters[k] for k in here if k in self.jitters}})
        self.write(i, layer)

    def write(self, i: int, layer: nn.Module) -> None:
        """A layer-wise model's layer goes to disk now, so the compressed model is never whole in memory."""
        if not self.writers:
            return
        prefix = self.family.layer_prefix(i)
        for r in self.ratios:
            self.writers[r].add(f"model-layer-{i:05d}.safetensors",
                                layer_tensors(layer, prefix, self.factors[r], self.family.linear_names))
        self.timings["peak_resident_weight_mb"] = max(self.timings["peak_resident_weight_mb"],
                                                      resident_bytes(self.model) / 2**20)
        for r in self.ratios:
            for k in [k for k in self.factors[r] if k.startswith(prefix)]:
                del self.factors[r][k]

    def restore(self, i: int, layer: nn.Module) -> None:
        """Layer i's factors from an interrupted closed-form pass, swapped in as if just computed."""
        pairs, info = self.partial.load(i)
        for full, pair in pairs.items():
            self.factors[self.ratios[0]][full] = pair
            self.losses[self.ratios[0]][full] = info["loss"][full]
        self.update_gain.update(info["gain"])
        self.jitters.update(info["jitter"])
        self.applied.update(swap_in(self.model, pairs))
        self.write(i, layer)


class FromStatistics(LayerProcessor):
    """The factorization processor of a walk without windows: each layer factorized from statistics already at hand
    (`stats_of(i)`, from the cache) or from the weights alone (`stats_of` None)."""

    desc = "factorization"

    def __init__(self, factorizer: LayerFactorizer, stats_of=None):
        self.factorizer, self.stats_of = factorizer, stats_of

    def layer(self, step: Step) -> None:
        self.factorizer.layer(step.i, step.layer, self.stats_of(step.i) if self.stats_of is not None else None)


def layer_tensors(layer: nn.Module, prefix: str, factors: dict, linears: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Decoder layer's tensors as the saved model names them: each factorized linear as its u/v factors."""
    out = {}
    for name, t in layer.state_dict().items():
        # the linear may still be dense or already swapped for ratio[0]'s LowRankLinear (closed-form update)
        linear = next((n for n in linears if name.startswith(n + ".")), None)
        pair = factors.get(prefix + linear) if linear else None
        if pair is None:
            out[prefix + name] = t
            continue
        out[f"{prefix}{linear}.u.weight"], out[f"{prefix}{linear}.v.weight"] = pair
        if name.endswith("bias"):  # a linear's bias goes with W_u
            out[f"{prefix}{linear}.u.bias"] = t
    for k, v in out.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise SvdllmError(f"{k} contains NaN or inf after factorization; nothing was written.")
    return out
