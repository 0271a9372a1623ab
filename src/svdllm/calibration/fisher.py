"""Gradient statistics of the language-model loss on the calibration windows, one decoder layer at a time.

Three quantities come out of one forward/backward pass per window:
- `rows`: the FWSVD row Fisher (Hsu et al. 2022), Σ_windows Σ_j (∂L/∂W_ij)² per output row of each weight;
- `outputs`: Σ_tokens (∂L/∂y_i)² per output channel of each linear, the diagonal of the output-gradient second
  moment G. Under the Kronecker (KFAC) approximation a change ΔW raises the loss by ≈ ½·tr(G·ΔW·XᵀX·ΔWᵀ), so G
  turns each matrix's output error into a predicted loss increase: the sensitivity the global allocator uses.
- `output_grams` (only when asked, for kfac-svd): the whole second moment G = Σ_tokens (∂L/∂y)(∂L/∂y)ᵀ per linear,
  m × m in float64. q, k and v share an input but not an output, so each linear has its own.

The pass never holds the whole model's activations or graph. Forward, one layer at a time, saving each layer's
input hidden states to disk; the final norm, LM head and loss in chunks of tokens, so that the full logits
(tokens × vocabulary) never exist at once; then backward from the top, one layer at a time: recompute the layer
from its saved input, back-propagate the incoming gradient, sum that layer's statistics, hand the input gradient
down. Peak memory is one layer's weights, its activations on the gradient windows and its statistics, whatever the
depth; the price is one extra forward per layer. A layer-wise (lazy) model reads each layer from its checkpoint
when it is needed.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import SvdllmError
from ..models.families import LINEAR_NAMES, family_of
from ..models.lazy import resident
from . import distributed
from .layerwise import (_layer_output, capture_layer_inputs, check_finite, chunk_nll, model_device, run_layer,
                        token_chunks)

@dataclass
class GradientStats:
    rows: dict[str, torch.Tensor]  # name -> Σ_windows Σ_j (∂L/∂W_ij)², float64 (m,)
    outputs: dict[str, torch.Tensor]  # name -> Σ_tokens (∂L/∂y_i)², float64 (m,)
    windows: int
    output_grams: Mapping[str, torch.Tensor] | None = None  # name -> Σ_tokens (∂L/∂y)(∂L/∂y)ᵀ, float64 (m, m)


def head_gradient(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(∂L/∂h, L) for one window: h (1, T, d) the last decoder layer's output, L the window's mean next-token
    cross-entropy as `model(input_ids=ids, labels=ids).loss` computes it, its logits a chunk of tokens at a time."""
    n = ids.shape[-1] - 1  # the last position predicts nothing
    grad, total = torch.zeros_like(hidden), 0.0
    for s, e in token_chunks(model, n):
        h = hidden[:, s:e].detach().requires_grad_(True)
        with torch.enable_grad():
            loss = chunk_nll(model, h, ids[:, s : e + 1], (0, e - s)) / n
            loss.backward()
        grad[:, s:e] = h.grad
        total += loss.item()
    return grad, total


class _Activations:
    """Each decoder layer's input on the gradient windows, one safetensors file per layer in a scratch directory."""

    def __init__(self, root: str | Path | None):
        if root is not None:
            Path(root).mkdir(parents=True, exist_ok=True)
        self._dir = tempfile.TemporaryDirectory(prefix="svdllm-activations-", dir=root)

    def put(self, i: int, hidden: list[torch.Tensor]) -> None:
        save_file({"h": torch.cat(hidden).contiguous()}, f"{self._dir.name}/{i}.safetensors")

    def take(self, i: int) -> list[torch.Tensor]:
        path = Path(self._dir.name) / f"{i}.safetensors"
        h = load_file(path)["h"]
        path.unlink()
        return list(h.split(1))

    def close(self) -> None:
        self._dir.cleanup()


def gradient_stats(model: nn.Module, windows: torch.Tensor, progress: bool = True, output_grams: bool = False,
                   sink: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
                   scratch: str | Path | None = None) -> GradientStats:
    """One forward and backward pass per calibration window, a decoder layer at a time (module docstring).

    With `output_grams`, each layer's Grams are handed to `sink(layer index, {name: G})` as the backward pass
    leaves the layer (kept in memory and returned when there is no sink). The layers' saved inputs go to a
    temporary directory under `scratch` (the system's if None), removed at the end."""
    windows = distributed.shard(windows)  # under torchrun: this rank's windows; sums all-reduced
    if windows.shape[0] == 0:
        raise SvdllmError(f"More processes ({distributed.world_size()}) than gradient windows; raise --grad-samples.")
    family = family_of(model)
    layers = family.decoder_layers(model)
    device = model_device(model)
    was_training = model.training
    model.eval()
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    rows, outputs, kept = {}, {}, {}
    saved = _Activations(scratch)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        hidden, layer_kwargs = capture_layer_inputs(model, windows)
        for i, layer in enumerate(tqdm(layers, desc="gradients (forward)", unit="layer", disable=not progress)):
            saved.put(i, hidden)
            with resident(model, i):
                hidden = run_layer(layer, hidden, layer_kwargs[i], device)[0]
            for h in hidden:
                check_finite(h, f"the output of {family.linear_name(i, '').rstrip('.')}")
        grads = []
        for k, h in enumerate(hidden):
            g, loss = head_gradient(model, h.to(device), windows[k : k + 1].to(device))
            if not torch.isfinite(torch.tensor(loss)):
                raise SvdllmError(f"Non-finite loss on gradient window {k}; load the model with --dtype float32.")
            grads.append(g)
        del hidden
        for i in tqdm(range(len(layers) - 1, -1, -1), desc="gradients (backward)", unit="layer",
                      disable=not progress):
            with resident(model, i):
                grads, grams = _layer_backward(family, i, layers[i], saved.take(i), grads, layer_kwargs[i], device,
                                               rows, outputs, output_grams)
            if grams is not None:
                grams = distributed.all_reduce_sum(grams)
                if sink is not None:
                    sink(i, grams)
                else:
                    kept.update(grams)
    finally:
        saved.close()
        for name, p in model.named_parameters():
            p.requires_grad_(previous.get(name, False))
        model.train(was_training)
    order = [family.linear_name(i, n) for i in range(len(layers)) for n in LINEAR_NAMES]  # layer 0 first
    rows = distributed.all_reduce_sum({name: rows[name] for name in order})
    outputs = distributed.all_reduce_sum({name: outputs[name] for name in order})
    for name in rows:
        if not (torch.isfinite(rows[name]).all() and torch.isfinite(outputs[name]).all()):
            raise SvdllmError(f"The gradients of {name} overflowed to inf/NaN; load the model with --dtype float32.")
    grams_out = (kept if sink is None else None) if output_grams else None
    return GradientStats(rows, outputs, distributed.sum_int(len(windows)), grams_out)


def _layer_backward(family, i: int, layer: nn.Module, inputs: list[torch.Tensor], grads: list[torch.Tensor],
                    kwargs: dict, device, rows: dict, outputs: dict, with_grams: bool):
    """Back-propagate each window's output gradient through decoder layer i (recomputed from its saved input),
    adding the layer's statistics to `rows` and `outputs`; returns (the input gradients, the layer's Grams)."""
    linears = {family.linear_name(i, n): layer.get_submodule(n) for n in LINEAR_NAMES}
    for name, m in linears.items():
        rows[name] = torch.zeros(m.out_features, dtype=torch.float64)
        outputs[name] = torch.zeros(m.out_features, dtype=torch.float64)
    grams = {name: torch.zeros(m.out_features, m.out_features, dtype=torch.float64, device=device)
             for name, m in linears.items()} if with_grams else None

    def output_hook(name):
        def accumulate(g):
            g = g.detach().to(torch.float64).reshape(-1, g.shape[-1])
            outputs[name] += g.pow(2).sum(0).cpu()
            if grams is not None:
                grams[name] += g.T @ g

        def hook(module, args, out):  # a tensor hook on the output sees ∂L/∂y during backward
            if out.requires_grad:
                out.register_hook(accumulate)
        return hook

    for m in linears.values():
        m.weight.requires_grad_(True)
    handles = [m.register_forward_hook(output_hook(name)) for name, m in linears.items()]
    below = []
    try:
        for x, g in zip(inputs, grads):
            x = x.to(device).requires_grad_(True)
            with torch.enable_grad():
                out = _layer_output(layer(x, **kwargs))
            out.backward(g.to(device, out.dtype))
            for name, m in linears.items():
                rows[name] += m.weight.grad.detach().to(torch.float64).pow(2).sum(1).cpu()
                m.weight.grad = None
            below.append(x.grad.detach())
    finally:
        for h in handles:
            h.remove()
        for m in linears.values():
            m.weight.requires_grad_(False)
    return below, None if grams is None else {k: v.cpu() for k, v in grams.items()}


def fisher_rows(model: nn.Module, windows: torch.Tensor, progress: bool = True) -> dict[str, torch.Tensor]:
    """name -> Σ over windows of Σ_j (∂L/∂W_ij)² (FWSVD's row Fisher)."""
    return gradient_stats(model, windows, progress).rows
