"""Layer-by-layer calibration: the inputs of decoder layer 0 are captured once, then one layer runs at a time.

Peak memory is the calibration activations of one layer plus that layer's Gram matrices, never the whole model's.
For every group of linears that read the same tensor (q/k/v, gate/up, o, down) one Gram matrix XᵀX is
accumulated in float64: 4 per layer, not 7.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SvdllmError
from ..models.families import GROUP_OF, INPUT_GROUPS, family_of

log = logging.getLogger(__name__)


@dataclass
class LinearStats:
    """What a factorization method may know about one linear's inputs X (tokens × n)."""

    gram: torch.Tensor | None = None  # XᵀX, float64, n × n
    abs_sum: torch.Tensor | None = None  # Σ_t |x_t|, float64, n (ASVD's activation scale is abs_sum / tokens)
    tokens: int = 0
    fisher_rows: torch.Tensor | None = None  # Σ_j (∂L/∂W_ij)², float64, m (FWSVD)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class LayerStats:
    """Statistics of one decoder layer's linear inputs, per input group (float64, summed over tokens)."""

    grams: dict[str, torch.Tensor]
    abs_sums: dict[str, torch.Tensor]
    tokens: int

    def gram_for(self, linear_name: str) -> torch.Tensor:
        return self.grams[GROUP_OF[linear_name]]

    def for_linear(self, linear_name: str) -> LinearStats:
        group = GROUP_OF[linear_name]
        return LinearStats(self.grams[group], self.abs_sums[group], self.tokens)


class _StopForward(Exception):
    """Raised inside decoder layer 0 once its input is captured: the rest of the model need not run."""


def _model_device(model: nn.Module) -> torch.device:
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


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, device, groups=None, where: str = ""):
    """Run one decoder layer on every input batch; with `groups`, also accumulate their Gram matrices."""
    grams: dict[str, torch.Tensor] = {}
    abs_sums: dict[str, torch.Tensor] = {}
    handles = []
    if groups:
        for group in groups:
            first = layer.get_submodule(INPUT_GROUPS[group][0])

            def hook(module, args, out, group=group):
                x = args[0].reshape(-1, args[0].shape[-1])
                _check_finite(x, f"{where}.{INPUT_GROUPS[group][0]}")
                x = x.to(torch.float64)
                if group in grams:
                    grams[group].addmm_(x.T, x)
                    abs_sums[group] += x.abs().sum(0)
                else:
                    grams[group] = x.T @ x
                    abs_sums[group] = x.abs().sum(0)

            handles.append(first.register_forward_hook(hook))
    outputs = []
    try:
        for h in inputs:
            out = _layer_output(layer(h.to(device), **kwargs))
            outputs.append(out.detach().to("cpu"))
    finally:
        for handle in handles:
            handle.remove()
    return outputs, {g: t.to("cpu") for g, t in grams.items()}, {g: t.to("cpu") for g, t in abs_sums.items()}


def calibrate_layers(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    on_layer: Callable[[int, nn.Module, LayerStats], bool] | None = None,
    progress: bool = True,
) -> Iterator[tuple[int, LayerStats]]:
    """Yield (layer index, statistics) for every decoder layer, one layer at a time.

    `on_layer(i, layer, stats)` runs before the layer's outputs are passed on; if it changes the layer (compresses
    it) and returns True, the outputs are recomputed with the changed layer: the sequential mode, in which every
    layer is calibrated on the activations of the already-compressed layers before it.
    """
    layers = family_of(model).decoder_layers(model)
    device = _model_device(model)
    hidden, layer_kwargs = capture_layer_inputs(model, windows, batch_size)
    tokens = int(windows.numel())
    for i, layer in enumerate(tqdm(layers, desc="calibration", unit="layer", disable=not progress)):
        kwargs = layer_kwargs[i]
        outputs, grams, abs_sums = run_layer(layer, hidden, kwargs, device, INPUT_GROUPS, where=f"model.layers.{i}")
        stats = LayerStats(grams, abs_sums, tokens)
        if on_layer is not None and on_layer(i, layer, stats):
            outputs, _, _ = run_layer(layer, hidden, kwargs, device)
        for out in outputs:
            _check_finite(out, f"the output of model.layers.{i}")
        hidden = outputs
        yield i, stats
