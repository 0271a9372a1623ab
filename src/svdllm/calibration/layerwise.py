"""Layer-by-layer calibration: the inputs of decoder layer 0 are captured once, then one layer runs at a time.

Peak memory is the calibration activations of one layer plus that layer's Gram matrices, never the whole model's.
For every group of linears that read the same tensor (q/k/v, gate/up, o, down) one Gram matrix XᵀX is
accumulated in float64: 4 per layer, not 7.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SvdllmError
from . import distributed
from ..models.families import GROUP_OF, INPUT_GROUPS, family_of, layer_prefix
from ..models.lazy import is_lazy, materialize

log = logging.getLogger(__name__)


@dataclass
class LinearStats:
    """What a factorization method may know about one linear's inputs X (tokens × n)."""

    gram: torch.Tensor | None = None  # XᵀX, float64, n × n
    abs_sum: torch.Tensor | None = None  # Σ_t |x_t|, float64, n (ASVD's activation scale is abs_sum / tokens)
    tokens: int = 0
    fisher_rows: torch.Tensor | None = None  # Σ_j (∂L/∂W_ij)², float64, m (FWSVD)
    output_gram: torch.Tensor | None = None  # Σ_t g_t g_tᵀ, g = ∂L/∂y, float64, m × m (kfac-svd)
    gram_compressed: torch.Tensor | None = None  # X′ᵀX′ of the compressed model's inputs X′, n × n
    cross: torch.Tensor | None = None  # XᵀX′, dense-model inputs against compressed-model ones, n × n

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class LayerStats:
    """Statistics of one decoder layer's linear inputs, per input group (float64, summed over tokens)."""

    grams: dict[str, torch.Tensor]
    abs_sums: dict[str, torch.Tensor]
    tokens: int
    # with a compressed-model stream X′ beside the dense one (closed-form update): XᵀX′ and X′ᵀX′
    cross: dict[str, torch.Tensor] | None = None
    grams_compressed: dict[str, torch.Tensor] | None = None

    def gram_for(self, linear_name: str) -> torch.Tensor:
        return self.grams[GROUP_OF[linear_name]]

    def for_linear(self, linear_name: str) -> LinearStats:
        g = GROUP_OF[linear_name]
        if self.grams_compressed is None:
            return LinearStats(self.grams[g], self.abs_sums[g], self.tokens)
        return LinearStats(self.grams[g], self.abs_sums[g], self.tokens, gram_compressed=self.grams_compressed.get(g),
                           cross=(self.cross or {}).get(g))


def linear_stats(stats: LayerStats | None, grads, full: str, name: str) -> LinearStats:
    """Everything known about linear `full` (`name` within its layer): its input statistics from `stats`, and from
    the gradient statistics `grads` (a GradientStats or None) its row Fisher and output-gradient Gram."""
    out = stats.for_linear(name) if stats is not None else LinearStats()
    if grads is not None:
        out.fisher_rows = grads.rows[full]
        if grads.output_grams is not None:
            out.output_gram = grads.output_grams[full]
    return out


class _StopForward(Exception):
    """Raised inside a layer once the input wanted from it is captured: the rest of the forward need not run."""


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _layer_output(out) -> torch.Tensor:
    # transformers >= 5 returns a tensor from a decoder layer, older releases a tuple
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _pass_through(layers):
    """Decoder layers that return their input: the model's own loop then builds every layer's keyword arguments
    (masks, rotary tables per layer type) without touching a weight."""
    for layer in layers:
        layer.forward = lambda hidden_states=None, *args, **kwargs: hidden_states
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 1):
    """Run the embeddings only, returning (hidden-state batches of layer 0, per-layer keyword arguments).

    The keyword arguments (attention masks, rotary embeddings) differ per layer in some families (Gemma 3 mixes
    sliding-window and global layers), so they are recorded for every layer from one full forward of one window;
    they depend only on the sequence length, which every calibration window shares.
    """
    layers = family_of(model).decoder_layers(model)
    device = _model_device(model)
    layer_kwargs: list[dict | None] = [None] * len(layers)
    captured: list[torch.Tensor] = []
    stop_at_first = [False]

    def make_hook(i):
        def hook(module, args, kwargs):
            kw = dict(kwargs)
            hidden = args[0] if args else kw.pop("hidden_states")
            if layer_kwargs[i] is None:
                layer_kwargs[i] = kw
            if i == 0:
                captured.append(hidden.detach().to("cpu"))
                if stop_at_first[0]:
                    raise _StopForward
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        if is_lazy(model):  # the layers are not in memory: let them pass the hidden state through unchanged
            with _pass_through(layers):
                model.model(input_ids=windows[:1].to(device), use_cache=False)
        else:
            model.model(input_ids=windows[:1].to(device), use_cache=False)  # records every layer's kwargs
        captured.clear()
        stop_at_first[0] = True
        for start in range(0, windows.shape[0], batch_size):
            try:
                model.model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return captured, layer_kwargs


def _check_finite(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise SvdllmError(
            f"Non-finite activations (NaN or inf) at the input of {where}. The model overflows in its dtype on the "
            "calibration text: load it with --dtype float32 (or bfloat16 instead of float16)."
        )


class _GroupInputs:
    """Forward hooks that record, for the batch being run, the input of the first linear of each group."""

    def __init__(self, layer: nn.Module, groups, where: str):
        self.current: dict[str, torch.Tensor] = {}
        self.handles = []
        for group in groups:
            def hook(module, args, out, group=group):
                x = args[0].reshape(-1, args[0].shape[-1])
                _check_finite(x, f"{where}.{INPUT_GROUPS[group][0]}")
                self.current[group] = x.to(torch.float64)

            self.handles.append(layer.get_submodule(INPUT_GROUPS[group][0]).register_forward_hook(hook))

    def take(self) -> dict[str, torch.Tensor]:
        out, self.current = self.current, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _accumulate(acc: dict, key: str, value: torch.Tensor) -> None:
    if key in acc:
        acc[key] += value
    else:
        acc[key] = value


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, device, groups=None, where: str = ""):
    """Run one decoder layer on every input batch and return (outputs, LayerStats or None).

    With `groups`, the Gram matrix XᵀX and Σ|x| of each group's input are accumulated (float64).
    """
    grams, abs_sums = {}, {}
    capture = _GroupInputs(layer, groups, where) if groups else None
    outputs = []
    try:
        for h in inputs:
            outputs.append(_layer_output(layer(h.to(device), **kwargs)).detach().to("cpu"))
            if capture is None:
                continue
            for g, x in capture.take().items():
                _accumulate(grams, g, x.T @ x)
                _accumulate(abs_sums, g, x.abs().sum(0))
    finally:
        if capture is not None:
            capture.remove()
    if capture is None:
        return outputs, None
    cpu = lambda d: {g: t.to("cpu") for g, t in d.items()}  # noqa: E731
    tokens = sum(int(h.shape[0] * h.shape[1]) for h in inputs)
    return outputs, LayerStats(cpu(grams), cpu(abs_sums), tokens)


@torch.no_grad()
def _input_of(layer: nn.Module, name: str, hidden: torch.Tensor, kwargs: dict, device, where: str) -> torch.Tensor:
    """The input (tokens × n, float64) that linear `name` of `layer` receives; the forward stops right there."""
    got = []

    def hook(module, args):
        got.append(args[0].reshape(-1, args[0].shape[-1]).to(torch.float64))
        raise _StopForward

    handle = layer.get_submodule(name).register_forward_pre_hook(hook)
    try:
        layer(hidden.to(device), **kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    _check_finite(got[0], f"{where}.{name}")
    return got[0]


def _paired_moments(dense: nn.Module | None, layer: nn.Module, hidden, compressed, kwargs, device, group: str,
                    where: str, keep: list | None = None):
    """(XᵀX′ or None, X′ᵀX′) of one input group. X′ comes from the layer as it now is (the groups before `group`
    already compressed) on the compressed stream: the inputs the group's linears will really see in the compressed
    model. X, only if `dense` is given, from the dense layer on the dense stream. `keep` receives X′ per batch, in
    the stream's dtype and shape, on the CPU."""
    name = INPUT_GROUPS[group][0]
    moments = {}
    for h, hc in zip(hidden, compressed):
        xc = _input_of(layer, name, hc, kwargs, device, where)
        if keep is not None:  # (float64 holds the float32/16 values exactly: the cast back loses nothing)
            keep.append(xc.to("cpu", hc.dtype).view(*hc.shape[:-1], -1))
        _accumulate(moments, "gram_c", xc.T @ xc)
        if dense is not None:
            _accumulate(moments, "cross", _input_of(dense, name, h, kwargs, device, where).T @ xc)
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


def _sum_over_ranks(stats: LayerStats) -> LayerStats:
    if not distributed.active():
        return stats
    reduce = lambda d: None if d is None else distributed.all_reduce_sum(d)  # noqa: E731
    return LayerStats(reduce(stats.grams), reduce(stats.abs_sums), distributed.sum_int(stats.tokens),
                      reduce(stats.cross), reduce(stats.grams_compressed))


def calibrate_layers(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    on_layer: Callable[[int, nn.Module, LayerStats], bool] | None = None,
    progress: bool = True,
    paired: bool = False,
    drift_groups: tuple[str, ...] = (),
    cached: Callable[[int], LayerStats | None] | None = None,
    on_exit: Callable[[int, nn.Module], None] | None = None,
    restore: Callable[[int, nn.Module], bool] | None = None,
    dense_cached: bool = False,
) -> Iterator[tuple[int, LayerStats]]:
    """Yield (layer index, statistics) for every decoder layer, one layer at a time.

    `on_layer(i, layer, stats)` runs before the layer's outputs are passed on; if it changes the layer (compresses
    it) and returns True, the outputs are recomputed with the changed layer: the sequential mode, in which every
    layer is calibrated on the activations of the already-compressed layers before it.

    With `paired`, two streams run side by side: the dense model's activations (whose statistics are yielded as
    usual) and the compressed model's (on_layer's changes apply to it only), whose Gram matrices X′ᵀX′ are added
    to the statistics, with the cross moments XᵀX′ for the input groups in `drift_groups`. Within a layer the
    groups are compressed in forward order, `on_layer(i, layer, stats, names)` once per group: the moments of
    o_proj's inputs are taken with q/k/v already compressed, and so on, so each linear is fitted to what it will
    really receive. (Taking them all from the dense layer fits o_proj and down_proj to inputs they never see:
    SmolLM2's perplexity at R = 0.4 went from 239 to 3,938.)

    `cached(i)` may return layer i's statistics from an earlier, interrupted run: the layer then only runs
    forward (no Gram accumulation, most of a layer's cost) to feed the next one. Dense-model statistics only;
    with `paired`, `restore(i, layer)` may swap in layer i's factors from an interrupted run and return True: both
    streams then only run forward through the layer.

    With `paired`, no `drift_groups` and `dense_cached` (every layer's statistics are in `cached`), the dense
    stream is not run at all: nothing but its statistics is needed from it. Within a layer, the attention core
    softmax(QKᵀ)V stops changing once q/k/v are compressed: recorded at o_proj's input (where o_proj's moments are
    taken anyway), it gives the attention's output through the compressed o_proj for the MLP's groups and the
    layer's output, without being computed again (over long windows the attention is most of the pass).

    A layer-wise (lazy) model has each layer materialized from its checkpoint just before it runs; `on_exit(i,
    layer)` runs once the layer's outputs are passed on (the pipeline writes and releases it there).
    """
    layers = family_of(model).decoder_layers(model)
    device = _model_device(model)
    windows = distributed.shard(windows)  # under torchrun: this rank's windows; the sums are all-reduced below
    if windows.shape[0] == 0:
        raise SvdllmError(f"More processes ({distributed.world_size()}) than calibration windows; raise --nsamples.")
    hidden, layer_kwargs = capture_layer_inputs(model, windows, batch_size)
    compressed = list(hidden) if paired else None
    dense_stream = not (paired and not drift_groups and dense_cached and cached is not None)
    attention = INPUT_GROUPS["attn_out"][0].rsplit(".", 1)[0]
    for i, layer in enumerate(tqdm(layers, desc="calibration", unit="layer", disable=not progress)):
        if is_lazy(model):
            materialize(model, layer_prefix(i))
        kwargs, where = layer_kwargs[i], layer_prefix(i).rstrip(".")
        stats = cached(i) if cached is not None else None
        if not dense_stream:  # (the layer's outputs are the compressed stream's, set below)
            if stats is None:
                raise SvdllmError(f"The statistics of {where} vanished from the cache during the pass; run again.")
        elif stats is None:
            outputs, stats = run_layer(layer, hidden, kwargs, device, INPUT_GROUPS, where)
            stats = _sum_over_ranks(stats)
        else:
            outputs = run_layer(layer, hidden, kwargs, device)[0]
        if paired:
            attn_out: list = []
            if restore is None or not restore(i, layer):
                # the dense stream's inputs come from the layer as it was before any of its groups changed
                dense = copy.deepcopy(layer) if drift_groups else None
                stats.cross, stats.grams_compressed = {}, {}
                cores: list = []  # o_proj's inputs on the compressed stream, once q/k/v are compressed
                for group, names in INPUT_GROUPS.items():
                    with contextlib.ExitStack() as stage:
                        if group == "mlp_in":  # q/k/v and o are final from here on
                            stage.enter_context(_attention_from_cores(
                                layer.get_submodule(attention), layer.get_submodule(INPUT_GROUPS["attn_out"][0]),
                                cores, attn_out))
                        elif group == "mlp_out" and len(attn_out) == len(compressed):
                            stage.enter_context(_replaying(layer.get_submodule(attention), attn_out))
                        stats.cross[group], stats.grams_compressed[group] = _paired_moments(
                            dense if group in drift_groups else None, layer, hidden, compressed, kwargs, device,
                            group, where, keep=cores if group == "attn_out" else None)
                    if group == "mlp_in":
                        cores.clear()
                    if on_layer is not None:
                        on_layer(i, layer, stats, names)
                del dense
            with contextlib.ExitStack() as stage:
                if len(attn_out) == len(compressed):
                    stage.enter_context(_replaying(layer.get_submodule(attention), attn_out))
                compressed = run_layer(layer, compressed, kwargs, device)[0]
            del attn_out
            for out in compressed:
                _check_finite(out, f"the output of compressed {where}")
            if not dense_stream:
                outputs = compressed
        elif on_layer is not None and on_layer(i, layer, stats):
            outputs = run_layer(layer, hidden, kwargs, device)[0]
        if dense_stream:
            for out in outputs:
                _check_finite(out, f"the output of {where}")
        hidden = outputs
        if on_exit is not None:
            on_exit(i, layer)
        yield i, stats
