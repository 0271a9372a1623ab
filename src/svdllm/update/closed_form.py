"""SVD-LLM's closed-form parameter update, from the moments of the inputs each linear really receives.

W_v stays as the truncation made it and W_u is refitted by least squares, so that W_u·W_v·X′ best matches W·X′ (or
W·X), X′ being the inputs the linear receives in the compressed model. Those exist only in a pass through the
model as it is being compressed: the `ClosedFormPass` processor runs two streams side by side, the dense model's activations and
the compressed model's, and stops at every input group of every layer so that the consumer compresses the group
before the moments of the next group are taken. `PartialFactors` keeps each finished layer, so an interrupted pass
resumes after it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..utils.atomic import atomic_path
from ..calibration import distributed
from ..calibration.layerwise import LayerStats, accumulate, layer_statistics, sum_over_ranks
from ..calibration.walk import LayerProcessor, Step, Walk, check_finite, input_of
from ..errors import SvdllmError


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


def refit(weight: torch.Tensor, w_u: torch.Tensor, w_v: torch.Tensor, stats) -> tuple[torch.Tensor, float]:
    """(W_u refitted by closed_form_w_u on the linear's paired moments `stats`, the relative reduction of the squared
    output error on the calibration data that it brings)."""
    w = weight.detach().to(torch.float64)
    before = output_error(w, w_u, w_v, stats)
    w_u = closed_form_w_u(w, w_v, stats.gram_compressed, stats.cross)
    return w_u, 1.0 - output_error(w, w_u, w_v, stats) / max(before, 1e-300)


class ClosedFormPass(LayerProcessor):
    """The pass of the closed-form update, a processor of the forward walk: the dense model's activations (the walk's
    stream, whose statistics come with every layer) and the compressed model's (this processor's own) side by side.
    Within a layer the input groups come in forward order: the moments X′ᵀX′ of the group's inputs on the compressed
    stream, taken with the groups before it already compressed (and, for `drift_groups`, XᵀX′ against the dense
    stream), then `compress(i, layer, stats, names)` compresses the group. So o_proj's moments are taken with q/k/v
    compressed, and so on: each linear is fitted to what it will really receive. (Taking them all from the dense
    layer fits o_proj and down_proj to inputs they never see: SmolLM2's perplexity at R = 0.4 went from 239 to
    3,938.) Once the layer's outputs are computed, `done(i, stats)` receives its dense statistics.

    `cached(i)` may give layer i's dense statistics; with every layer's there (`dense_cached`) and no drift groups,
    the dense stream is not run at all. The layers in `restored` were finished by an interrupted run:
    `restore(i, layer)` swaps their factors in, then both streams only run forward through them. Within a layer, the
    attention core softmax(QKᵀ)V stops changing once q/k/v are compressed: recorded at o_proj's input (where o_proj's
    moments are taken anyway), it gives the attention's output through the compressed o_proj for the MLP's groups and
    the layer's output, without being computed again (over long windows the attention is most of the pass).
    """

    desc = "calibration"

    def __init__(self, compress: Callable, restore: Callable, done: Callable, drift_groups: tuple[str, ...] = (),
                 cached: Callable[[int], LayerStats | None] | None = None, restored: frozenset[int] = frozenset(),
                 dense_cached: bool = False):
        self.compress, self.restore, self.done = compress, restore, done
        self.drift_groups, self.cached, self.restored = drift_groups, cached, restored
        self.dense_stream = not (not drift_groups and dense_cached and cached is not None)

    def start(self, walk: Walk) -> None:
        self.compressed = list(walk.hidden)

    def layer(self, step: Step) -> list[torch.Tensor]:
        groups, i, layer, where = step.family.groups, step.i, step.layer, step.where
        # the attention-core replay needs to know where attention ends; a family made from patterns runs every group
        roles = {"attn_out", "mlp_in", "mlp_out"} <= set(groups)
        o_proj = groups["attn_out"][0] if roles else None
        attention = o_proj.rsplit(".", 1)[0] if roles else None
        stats = self.cached(i) if self.cached is not None else None
        outputs = None
        if not self.dense_stream:  # (the layer's outputs are the compressed stream's, set below)
            if stats is None:
                raise SvdllmError(f"The statistics of {where} vanished from the cache during the pass; run again.")
        elif stats is None:
            outputs, stats = layer_statistics(step, groups)
            stats = sum_over_ranks(stats)
        else:
            outputs = step.run()
        attn_out: list = []
        if i in self.restored:
            self.restore(i, layer)
        else:
            # the dense stream's inputs come from the layer as it was before any of its groups changed
            dense = copy.deepcopy(layer) if self.drift_groups else None
            stats.cross, stats.grams_compressed = {}, {}
            cores: list = []  # o_proj's inputs on the compressed stream, once q/k/v are compressed
            for group, names in groups.items():
                with contextlib.ExitStack() as stage:
                    if roles and group == "mlp_in":  # q/k/v and o are final from here on
                        stage.enter_context(_attention_from_cores(
                            layer.get_submodule(attention), layer.get_submodule(o_proj), cores, attn_out))
                    elif roles and group == "mlp_out" and len(attn_out) == len(self.compressed):
                        stage.enter_context(_replaying(layer.get_submodule(attention), attn_out))
                    stats.cross[group], stats.grams_compressed[group] = _paired_moments(
                        dense if group in self.drift_groups else None, layer, step.inputs, self.compressed,
                        step.kwargs, step.device, names[0], where, keep=cores if roles and group == "attn_out" else None)
                if group == "mlp_in":
                    cores.clear()
                self.compress(i, layer, stats, tuple(names))
            del dense
        with contextlib.ExitStack() as stage:
            if len(attn_out) == len(self.compressed):
                stage.enter_context(_replaying(layer.get_submodule(attention), attn_out))
            self.compressed = step.run(inputs=self.compressed)
        del attn_out
        for out in self.compressed:
            check_finite(out, f"the output of compressed {where}")
        if self.dense_stream:
            for out in outputs:
                check_finite(out, f"the output of {where}")
        self.done(i, stats)
        return outputs if self.dense_stream else self.compressed


def _paired_moments(dense: nn.Module | None, layer: nn.Module, hidden, compressed, kwargs, device, name: str,
                    where: str, keep: list | None = None):
    """(XᵀX′ or None, X′ᵀX′) of one input group. X′ comes from the layer as it now is (the groups before this one,
    already compressed) on the compressed stream: the inputs the group's linears will really see in the compressed
    model. X, only if `dense` is given, from the dense layer on the dense stream. `keep` receives X′ per batch, in
    the stream's dtype and shape, on the CPU."""
    moments = {}
    for h, hc in zip(hidden, compressed):
        xc = input_of(layer, name, hc, kwargs, device, where)
        if keep is not None:  # (float64 holds the float32/16 values exactly: the cast back loses nothing)
            keep.append(xc.to("cpu", hc.dtype).view(*hc.shape[:-1], -1))
        accumulate(moments, "gram_c", xc.T @ xc)
        if dense is not None:
            accumulate(moments, "cross", input_of(dense, name, h, kwargs, device, where).T @ xc)
    if distributed.active():
        moments = distributed.all_reduce_sum(moments)
    cpu = {k: v.to("cpu") for k, v in moments.items()}
    return cpu.get("cross"), cpu["gram_c"]


@contextlib.contextmanager
def _attention_from_cores(attention: nn.Module, o_proj: nn.Module, cores: list, outputs: list):
    """While q/k/v stay as they are, the attention's output is o_proj(core), core = softmax(QKᵀ)V being o_proj's
    input, recorded once: `attention` returns that for each forward in turn instead of recomputing the core (the
    longest part of a layer over 2048-token windows). The first forward runs in full, to learn the form of the
    module's output. Every output is kept in `outputs` (attention weights, which an eager attention returns beside
    its output and the layer discards, as None: they are window × heads × tokens²)."""
    it = iter(range(len(cores)))
    compute = attention.forward

    def forward(*args, **kwargs):
        k = next(it)
        core, cores[k] = cores[k], None  # released once used: the cores and the outputs are not held in full twice
        if not outputs:
            out = compute(*args, **kwargs)
            out = (out[0],) + (None,) * (len(out) - 1) if isinstance(out, tuple) else out
        else:
            y = o_proj(core.to(next(o_proj.parameters()).device))
            out = (y,) + outputs[0][1:] if isinstance(outputs[0], tuple) else y
        outputs.append(out)
        return out

    with _forward_replaced(attention, forward):
        yield outputs


def _replaying(module: nn.Module, outputs: list):
    """`module` returns the recorded outputs, one per forward and in order, instead of computing them."""
    it = iter(outputs)
    return _forward_replaced(module, lambda *args, **kwargs: next(it))


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward):
    own = module.__dict__.get("forward")  # accelerate's device hooks live there: put back, not deleted
    module.forward = forward
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


class PartialFactors:
    """The factors of the layers a closed-form pass has finished, one atomic file per layer in `directory` (beside
    the statistics they came from): the same command, interrupted, resumes after the last finished layer instead of
    starting over. Keyed by everything the factors depend on besides the statistics."""

    def __init__(self, directory: Path, key: dict):
        import hashlib

        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.dir = Path(directory) / f"partial_{digest}"

    def _path(self, i: int) -> Path:
        return self.dir / f"layer_{i:04d}.safetensors"

    def save(self, i: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], info: dict) -> None:
        if not distributed.is_main():  # every rank holds the same gathered factors
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"{k}.{part}": t.contiguous() for k, pair in factors.items() for part, t in zip("uv", pair)}
        with atomic_path(self._path(i)) as tmp:
            save_file(tensors, tmp, metadata={"info": json.dumps(info), "key": json.dumps(self.key, sort_keys=True)})

    def has(self, i: int) -> bool:
        """Whether layer i was finished, on every rank alike."""
        return distributed.all_agree(self._path(i).exists())

    def load(self, i: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict] | None:
        """Layer i's factors and info if a finished layer was left, else None."""
        if not self.has(i):
            return None
        from safetensors import safe_open

        with safe_open(self._path(i), framework="pt") as f:
            info = json.loads(f.metadata()["info"])
        t = load_file(self._path(i))
        names = {k.rsplit(".", 1)[0] for k in t}
        return {n: (t[f"{n}.u"], t[f"{n}.v"]) for n in names}, info

    def clear(self) -> None:
        if distributed.is_main():
            shutil.rmtree(self.dir, ignore_errors=True)
