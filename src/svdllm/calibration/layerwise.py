"""Layer-by-layer calibration: the inputs of decoder layer 0 are captured once, then one layer runs at a time.

Peak memory is the calibration activations of one layer plus that layer's Gram matrices, never the whole model's.
For every group of linears that read the same tensor (q/k/v, gate/up, o, down) one Gram matrix XᵀX is
accumulated in float64: 4 per layer, not 7.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SvdllmError
from . import distributed
from ..models.families import family_of
from ..models.lazy import is_lazy, materialize, pass_through, release, resident

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

    def for_group(self, g: str) -> LinearStats:
        """What the linears of input group `g` know about their (shared) input."""
        if self.grams_compressed is None:
            return LinearStats(self.grams[g], self.abs_sums[g], self.tokens)
        return LinearStats(self.grams[g], self.abs_sums[g], self.tokens, gram_compressed=self.grams_compressed.get(g),
                           cross=(self.cross or {}).get(g))


def linear_stats(stats: LayerStats | None, grads, full: str, group: str) -> LinearStats:
    """Everything known about linear `full` (of input group `group`): its input statistics from `stats`, and from
    the gradient statistics `grads` (a GradientStats or None) its row Fisher and output-gradient Gram."""
    out = stats.for_group(group) if stats is not None else LinearStats()
    if grads is not None:
        out.fisher_rows = grads.rows[full]
        if grads.output_grams is not None:
            out.output_gram = grads.output_grams[full]
    return out


class _StopForward(Exception):
    """Raised inside a layer once the input wanted from it is captured: the rest of the forward need not run."""


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _layer_output(out) -> torch.Tensor:
    # transformers >= 5 returns a tensor from a decoder layer, older releases a tuple
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 1):
    """Run the embeddings only, returning (hidden-state batches of layer 0, per-layer keyword arguments).

    The keyword arguments (attention masks, rotary embeddings) differ per layer in some families (Gemma 3 mixes
    sliding-window and global layers), so they are recorded for every layer from one full forward of one window;
    they depend only on the sequence length, which every calibration window shares.
    """
    layers = family_of(model).decoder_layers(model)
    device = model_device(model)
    body = model.base_model  # the decoder without its LM head (model.model, model.gpt_neox, ...)
    layer_kwargs: list[dict | None] = [None] * len(layers)
    captured: list[torch.Tensor] = []
    buffer: list[torch.Tensor] = []
    stop_at_first = [False]

    def make_hook(i):
        def hook(module, args, kwargs):
            kw = dict(kwargs)
            hidden = args[0] if args else kw.pop("hidden_states")
            if layer_kwargs[i] is None:
                layer_kwargs[i] = kw
            if i == 0 and stop_at_first[0]:
                if not buffer:
                    buffer.extend(batch_views(windows.shape[0], batch_size, hidden.shape[1:], hidden.dtype))
                captured.append(buffer[len(captured)].copy_(hidden.detach()))
                raise _StopForward
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        if is_lazy(model):  # the layers are not in memory: let them pass the hidden state through unchanged
            with pass_through(layers):
                body(input_ids=windows[:1].to(device), use_cache=False)
        else:
            body(input_ids=windows[:1].to(device), use_cache=False)  # records every layer's kwargs
        stop_at_first[0] = True
        for start in range(0, windows.shape[0], batch_size):
            try:
                body(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return captured, layer_kwargs


def batch_views(windows: int, batch_size: int, shape, dtype) -> list[torch.Tensor]:
    """Hidden-state batches of `windows` windows as views into one allocation. Kept as many small tensors, every
    window's activations would sit among the layer's freed temporaries in the C heap, which then cannot shrink:
    on SmolLM2 with 64 windows that held the forward pass 0.8 GB above its live data."""
    buffer = torch.empty((windows, *shape), dtype=dtype)
    return list(buffer.split(batch_size))


def check_finite(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise SvdllmError(
            f"Non-finite activations (NaN or inf) at the input of {where}. The model overflows in its dtype on the "
            "calibration text: load it with --dtype float32 (or bfloat16 instead of float16)."
        )


class _GroupInputs:
    """Forward hooks that record, for the batch being run, the input of the first linear of each group
    (`groups`: group -> the linears reading that input, as a Family lists them)."""

    def __init__(self, layer: nn.Module, groups: dict[str, tuple[str, ...]], where: str):
        self.current: dict[str, torch.Tensor] = {}
        self.handles = []
        for group, names in groups.items():
            def hook(module, args, out, group=group, name=names[0]):
                x = args[0].reshape(-1, args[0].shape[-1])
                check_finite(x, f"{where}.{name}")
                self.current[group] = x.to(torch.float64)

            self.handles.append(layer.get_submodule(names[0]).register_forward_hook(hook))

    def take(self) -> dict[str, torch.Tensor]:
        out, self.current = self.current, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def accumulate(acc: dict, key: str, value: torch.Tensor) -> None:
    if key in acc:
        acc[key] += value
    else:
        acc[key] = value


def accumulate_product(acc: dict, key: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc[key] += a @ b in place: the product never exists apart (a 14,336² Gram of a Llama-3-8B MLP is 1.6 GB)."""
    if key in acc:
        acc[key].addmm_(a, b)
    else:
        acc[key] = a @ b


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, device, groups=None, where: str = "",
              in_place: bool = False):
    """Run one decoder layer on every input batch and return (outputs, LayerStats or None).

    With `groups`, the Gram matrix XᵀX and Σ|x| of each group's input are accumulated (float64). With `in_place`,
    each batch's output overwrites its input once the layer is done with it: the pass then holds one copy of the
    activations, not two (2.1 GB saved for a Llama-3-8B at 64 × 2048 tokens in float32).
    """
    grams, abs_sums = {}, {}
    capture = _GroupInputs(layer, groups, where) if groups else None
    outputs: list[torch.Tensor] = []
    try:
        for j, h in enumerate(inputs):
            out = _layer_output(layer(h.to(device), **kwargs)).detach()
            if in_place:
                outputs = inputs
            elif j == 0:
                outputs = batch_views(sum(b.shape[0] for b in inputs), inputs[0].shape[0], out.shape[1:], out.dtype)
            outputs[j].copy_(out)
            del out
            if capture is None:
                continue
            for g, x in capture.take().items():
                accumulate_product(grams, g, x.T, x)
                accumulate(abs_sums, g, x.abs().sum(0))
    finally:
        if capture is not None:
            capture.remove()
    if capture is None:
        return outputs, None
    for g, names in groups.items():  # an expert no calibration token was routed to: its input has no moments
        if g not in grams:
            n = layer.get_submodule(names[0]).in_features
            grams[g], abs_sums[g] = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    cpu = lambda d: {g: t.to("cpu") for g, t in d.items()}  # noqa: E731
    tokens = sum(int(h.shape[0] * h.shape[1]) for h in inputs)
    return outputs, LayerStats(cpu(grams), cpu(abs_sums), tokens)


@torch.no_grad()
def input_of(layer: nn.Module, name: str, hidden: torch.Tensor, kwargs: dict, device, where: str) -> torch.Tensor:
    """The input (tokens × n, float64) that linear `name` of `layer` receives; the forward stops right there."""
    got = []

    def hook(module, args):
        got.append(args[0].reshape(-1, args[0].shape[-1]).to(torch.float64))
        raise _StopForward

    linear = layer.get_submodule(name)
    handle = linear.register_forward_pre_hook(hook)
    try:
        layer(hidden.to(device), **kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not got:  # an expert the router sent none of these tokens to
        return torch.zeros(0, linear.in_features, dtype=torch.float64, device=device)
    check_finite(got[0], f"{where}.{name}")
    return got[0]


def sum_over_ranks(stats: LayerStats) -> LayerStats:
    if not distributed.active():
        return stats
    reduce = lambda d: None if d is None else distributed.all_reduce_sum(d)  # noqa: E731
    return LayerStats(reduce(stats.grams), reduce(stats.abs_sums), distributed.sum_int(stats.tokens),
                      reduce(stats.cross), reduce(stats.grams_compressed))


def calibrate_layers(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
                     cached: Callable[[int], LayerStats | None] | None = None,
                     sequential: bool = False) -> Iterator[tuple[int, LayerStats]]:
    """Yield (layer index, statistics) for every decoder layer, one layer at a time.

    While the generator waits at its yield, the consumer may change layer i (factorize it). With `sequential`, the
    layer's outputs are then recomputed with the changed layer before they feed the next one: every layer is
    calibrated on the activations of the already-compressed layers before it (the sequential mode). Without it, the
    dense model's activations flow on, whatever the consumer did to the layer.

    `cached(i)` may return layer i's statistics from an earlier, interrupted run: the layer then only runs forward
    (no Gram accumulation, most of a layer's cost). A layer-wise (lazy) model has each layer read from its checkpoint
    just before it runs and dropped once its outputs are passed on.
    """
    family = family_of(model)
    layers = family.decoder_layers(model)
    device = model_device(model)
    hidden, layer_kwargs = capture_layer_inputs(model, shard_windows(windows), batch_size)
    for i, layer in enumerate(tqdm(layers, desc="calibration", unit="layer", disable=not progress)):
        if is_lazy(model):
            materialize(model, family.layer_prefix(i))
        kwargs, where = layer_kwargs[i], family.layer_prefix(i).rstrip(".")
        stats = cached(i) if cached is not None else None
        if stats is None:
            outputs, stats = run_layer(layer, hidden, kwargs, device, family.groups, where, in_place=not sequential)
            stats = sum_over_ranks(stats)
        else:
            outputs = run_layer(layer, hidden, kwargs, device, in_place=not sequential)[0]
        yield i, stats
        if sequential:
            outputs = run_layer(layer, hidden, kwargs, device)[0]
        for out in outputs:
            check_finite(out, f"the output of {where}")
        hidden = outputs
        if is_lazy(model):
            release(model, family.layer_prefix(i))


LOGIT_CHUNK_ELEMENTS = 2**25  # logits formed at once by the loss: 128 MB in float32, whatever the vocabulary


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits of the last decoder layer's output as the model's forward forms them: final norm (and OPT's
    projection), LM head and, where the family has it (Gemma), soft-capping."""
    for module in family_of(model).head_modules(model):
        hidden = module(hidden)
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def token_chunks(model: nn.Module, predictions: int) -> list[tuple[int, int]]:
    """[start, end) spans of positions whose logits fit LOGIT_CHUNK_ELEMENTS together: the full logits of a window
    (2048 × 262,144 for Gemma 3: 2 GB) never exist at once. The final norm acts per token, so chunks are exact."""
    step = max(1, LOGIT_CHUNK_ELEMENTS // model.get_output_embeddings().weight.shape[0])
    return [(s, min(s + step, predictions)) for s in range(0, predictions, step)]


def chunk_nll(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """Σ of the next-token cross-entropies at positions [s, e) of one window (hidden (1, T, d), ids (1, T)),
    in float32 as transformers' loss computes it, or float64 for a float64 model."""
    s, e = span
    logits = head_logits(model, hidden[:, s:e])
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(e - s, -1), ids[0, s + 1 : e + 1], reduction="sum")


@torch.no_grad()
def layerwise_loss(model: nn.Module, windows: torch.Tensor,
                   changed: Callable[[int], contextlib.AbstractContextManager] | None = None,
                   inputs: tuple | None = None) -> float:
    """The mean over `windows` of each window's mean next-token loss (`model(input_ids=w, labels=w).loss`), one
    decoder layer at a time: memory holds one layer and one window's logits chunk, whatever the depth. While layer
    i runs, the context `changed(i)` is entered (the allocation's measurements truncate the layer's matrices).
    `inputs`: what `capture_layer_inputs(model, windows)` returns, when many measurements share the windows."""
    layers = family_of(model).decoder_layers(model)
    device = model_device(model)
    hidden, layer_kwargs = inputs if inputs is not None else capture_layer_inputs(model, windows)
    for i, layer in enumerate(layers):
        with resident(model, i), (changed(i) if changed is not None else contextlib.nullcontext()):
            hidden = run_layer(layer, hidden, layer_kwargs[i], device)[0]
    total = 0.0
    for k, h in enumerate(hidden):
        ids, n = windows[k : k + 1].to(device), windows.shape[1] - 1
        h = h.to(device)
        total += sum(float(chunk_nll(model, h, ids, span)) for span in token_chunks(model, n)) / n
    return total / len(hidden)


def shard_windows(windows: torch.Tensor) -> torch.Tensor:
    """Under torchrun, this rank's windows (the sums are all-reduced across ranks)."""
    windows = distributed.shard(windows)
    if windows.shape[0] == 0:
        raise SvdllmError(f"More processes ({distributed.world_size()}) than calibration windows; raise --nsamples.")
    return windows
