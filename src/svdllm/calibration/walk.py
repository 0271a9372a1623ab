"""The walk over the decoder layers, written once: every phase that runs the model a layer at a time is a processor
the walk calls at each layer.

`Walk` captures the inputs of decoder layer 0 (this rank's windows under torchrun), then visits the layers in order:
it makes layer i resident (a layer-wise model reads it from its checkpoint and drops it after), hands the processor
a `Step` (the layer, its inputs, its keyword arguments), and passes the layer's outputs on to the next layer, checked
for NaN and inf. A processor decides what happens at a layer: gather input statistics, measure the loss with some
matrices truncated, factorize, refit, quantize. It returns the layer's outputs, or None to let the walk run the layer
as it now is. A walk without windows only visits the layers (the spectra, or factorizing from cached statistics).

`walk_backward` is the other walk, top layer first, for the gradient pass (calibration/fisher.py): the backward
needs each layer's input, which a forward walk has left on disk.

Peak memory is one layer's weights, the activations of the windows (one copy: a layer's outputs overwrite its
inputs where the processor allows it) and the processor's statistics of that layer, whatever the depth.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SvdllmError
from ..models.families import family_of
from ..models.lazy import is_lazy, pass_through, resident
from . import distributed


class _StopForward(Exception):
    """Raised inside a layer once the input wanted from it is captured: the rest of the forward need not run."""


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def layer_output(out) -> torch.Tensor:
    # transformers >= 5 returns a tensor from a decoder layer, older releases a tuple
    return out[0] if isinstance(out, (tuple, list)) else out


def check_finite(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise SvdllmError(
            f"Non-finite activations (NaN or inf) at the input of {where}. The model overflows in its dtype on the "
            "calibration text: load it with --dtype float32 (or bfloat16 instead of float16)."
        )


def batch_views(windows: int, batch_size: int, shape, dtype) -> list[torch.Tensor]:
    """Hidden-state batches of `windows` windows as views into one allocation. Kept as many small tensors, every
    window's activations would sit among the layer's freed temporaries in the C heap, which then cannot shrink:
    on SmolLM2 with 64 windows that held the forward pass 0.8 GB above its live data."""
    buffer = torch.empty((windows, *shape), dtype=dtype)
    return list(buffer.split(batch_size))


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


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, device, in_place: bool = False,
              after_batch: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """Run one decoder layer on every input batch and return its outputs. With `in_place`, each batch's output
    overwrites its input once the layer is done with it: the pass then holds one copy of the activations, not two
    (2.1 GB saved for a Llama-3-8B at 64 × 2048 tokens in float32). `after_batch` is called after each batch (the
    statistics gather what their hooks saw)."""
    outputs: list[torch.Tensor] = []
    for j, h in enumerate(inputs):
        out = layer_output(layer(h.to(device), **kwargs)).detach()
        if in_place:
            outputs = inputs
        elif j == 0:
            outputs = batch_views(sum(b.shape[0] for b in inputs), inputs[0].shape[0], out.shape[1:], out.dtype)
        outputs[j].copy_(out)
        del out
        if after_batch is not None:
            after_batch()
    return outputs


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


def shard_windows(windows: torch.Tensor, flag: str = "--nsamples") -> torch.Tensor:
    """Under torchrun, this rank's windows (the processors all-reduce their sums across ranks)."""
    windows = distributed.shard(windows)
    if windows.shape[0] == 0:
        raise SvdllmError(f"More processes ({distributed.world_size()}) than calibration windows; raise {flag}.")
    return windows


@dataclass
class Step:
    """Decoder layer i as the walk hands it to a processor: resident, with its inputs (one tensor per batch of
    windows; None in a walk without windows) and the keyword arguments the model passes it."""

    i: int
    layer: nn.Module
    where: str  # the layer's module path, for messages
    inputs: list[torch.Tensor] | None
    kwargs: dict | None
    device: torch.device
    family: object  # the model's Family (models/families.py): its linears and their input groups

    def run(self, in_place: bool = False, inputs: list[torch.Tensor] | None = None, after_batch=None):
        """The layer as it now is, on its inputs (or on `inputs`, another stream of the same windows)."""
        return run_layer(self.layer, self.inputs if inputs is None else inputs, self.kwargs, self.device, in_place,
                         after_batch)


class LayerProcessor:
    """What happens at each decoder layer of a walk. Subclasses override `layer`; `start` sees the walk before the
    first layer (the captured inputs, and where to begin when resuming) and `finish` after the last one (the
    outputs of the top layer), returning the walk's result."""

    desc = "layers"  # the progress bar's label
    check_outputs = True  # the walk checks each layer's outputs for NaN and inf

    def start(self, walk: Walk) -> None:
        pass

    def layer(self, step: Step) -> list[torch.Tensor] | None:
        """Do this processor's work at one layer; return the layer's outputs (None: the walk runs the layer)."""
        return None

    def finish(self, walk: Walk):
        return None


@dataclass
class Walk:
    """One forward walk over the decoder layers of `model` on `windows` (module docstring).

    `inputs`: what capture_layer_inputs returned, when several walks share the windows (the allocation's loss
    measurements). `shard`: under torchrun, split the windows across ranks (the flag that raises their count, for
    the message when there are fewer windows than ranks); None: every rank runs them all."""

    model: nn.Module
    windows: torch.Tensor | None = None
    batch_size: int = 1
    progress: bool = True
    shard: str | None = "--nsamples"
    inputs: tuple | None = None
    first: int = 0  # a processor resuming an interrupted walk starts it here (`hidden` then holds that layer's input)
    hidden: list[torch.Tensor] | None = field(default=None, init=False)
    given: bool = field(default=False, init=False)  # the inputs were handed in: layer `first` must not overwrite them
    layer_kwargs: list | None = field(default=None, init=False)

    def __post_init__(self):
        self.family = family_of(self.model)
        self.layers = self.family.decoder_layers(self.model)
        self.device = model_device(self.model)

    def capture(self) -> None:
        if self.windows is None:
            return
        self.given = self.inputs is not None
        if self.inputs is None:
            windows = self.windows if self.shard is None else shard_windows(self.windows, self.shard)
            self.inputs = capture_layer_inputs(self.model, windows, self.batch_size)
        self.hidden, self.layer_kwargs = self.inputs
        if not self.given:  # the walk's own capture: freed as the layers overwrite or replace it
            self.inputs = None

    def steps(self, desc: str = "layers", check: bool = True) -> Iterator[Step]:
        """Yield each layer's Step; the consumer may `pass_on` the layer's outputs before asking for the next one
        (otherwise the walk runs the layer as it then is). With `check`, every layer's outputs are checked for NaN
        and inf."""
        if self.layer_kwargs is None:
            self.capture()
        for i in tqdm(range(self.first, len(self.layers)), desc=desc, unit="layer", disable=not self.progress):
            layer, where = self.layers[i], self.family.layer_prefix(i).rstrip(".")
            with resident(self.model, i):
                step = Step(i, layer, where, self.hidden, None if self.layer_kwargs is None else self.layer_kwargs[i],
                            self.device, self.family)
                self._outputs = None
                yield step
                if self.windows is None:
                    continue
                outputs = self._outputs if self._outputs is not None else \
                    step.run(in_place=not (self.given and i == self.first))
                for out in outputs if check else ():
                    check_finite(out, f"the output of {where}")
                self.hidden = outputs

    def pass_on(self, outputs: list[torch.Tensor]) -> None:
        """The current layer's outputs, to be the next layer's inputs."""
        self._outputs = outputs

    def run(self, processor: LayerProcessor):
        """Call `processor` at every layer; return what its `finish` returns."""
        if self.layer_kwargs is None:
            self.capture()
        processor.start(self)
        for step in self.steps(processor.desc, processor.check_outputs):
            outputs = processor.layer(step)
            if outputs is not None:
                self.pass_on(outputs)
        return processor.finish(self)


def walk_backward(model: nn.Module, top: int, visit: Callable[[int, nn.Module], None], progress: bool = True,
                  desc: str = "backward") -> None:
    """The backward walk: layers top − 1 down to 0, each resident while `visit(i, layer)` runs."""
    layers = family_of(model).decoder_layers(model)
    for i in tqdm(range(top - 1, -1, -1), desc=desc, unit="layer", disable=not progress):
        with resident(model, i):
            visit(i, layers[i])
