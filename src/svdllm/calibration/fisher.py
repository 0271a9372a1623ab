"""Gradient statistics of the language-model loss on the calibration windows.

Two quantities come out of one forward/backward pass per window:
- `rows`: the FWSVD row Fisher (Hsu et al. 2022), Σ_windows Σ_j (∂L/∂W_ij)² per output row of each weight;
- `outputs`: Σ_tokens (∂L/∂y_i)² per output channel of each linear, the diagonal of the output-gradient second
  moment G. Under the Kronecker (KFAC) approximation a change ΔW raises the loss by ≈ ½·tr(G·ΔW·XᵀX·ΔWᵀ), so G
  turns each matrix's output error into a predicted loss increase: the sensitivity the global allocator uses.

- `output_grams` (only when asked, for kfac-svd): the whole second moment G = Σ_tokens (∂L/∂y)(∂L/∂y)ᵀ per linear,
  m × m in float64 (Σ m² · 8 bytes for the model: 1.3 GB for SmolLM2-135M). q, k and v share an input but not an
  output, so each linear has its own.

Gradients need the whole model, so this is a pass of its own, not part of the layer-by-layer one. Only the sums
above are kept: no per-token storage.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SvdllmError
from ..models.families import LINEAR_NAMES, family_of


@dataclass
class GradientStats:
    rows: dict[str, torch.Tensor]  # name -> Σ_windows Σ_j (∂L/∂W_ij)², float64 (m,)
    outputs: dict[str, torch.Tensor]  # name -> Σ_tokens (∂L/∂y_i)², float64 (m,)
    windows: int
    output_grams: Mapping[str, torch.Tensor] | None = None  # name -> Σ_tokens (∂L/∂y)(∂L/∂y)ᵀ, float64 (m, m)


def gradient_stats(model: nn.Module, windows: torch.Tensor, progress: bool = True,
                   output_grams: bool = False) -> GradientStats:
    """One forward and backward pass per calibration window; see the module docstring for what is summed."""
    from . import distributed

    windows = distributed.shard(windows)  # under torchrun: this rank's windows; sums all-reduced at the end
    layers = family_of(model).decoder_layers(model)
    family = family_of(model)
    modules = {family.linear_name(i, n): layer.get_submodule(n) for i, layer in enumerate(layers) for n in LINEAR_NAMES}
    previous = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    rows = {name: torch.zeros(m.out_features, dtype=torch.float64) for name, m in modules.items()}
    outputs = {name: torch.zeros(m.out_features, dtype=torch.float64) for name, m in modules.items()}
    grams = {name: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for name, m in modules.items()} \
        if output_grams else None

    def output_hook(name):
        def accumulate(g):
            g = g.detach().to(torch.float64).reshape(-1, g.shape[-1])
            outputs[name] += g.pow(2).sum(0).cpu()
            if grams is not None:  # moved off the accelerator as soon as each window's product is formed
                grams[name] += (g.T @ g).cpu()

        def hook(module, args, out):  # a tensor hook on the output sees ∂L/∂y during backward
            if out.requires_grad:
                out.register_hook(accumulate)
        return hook

    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(output_hook(name)) for name, m in modules.items()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in modules.values():
            m.weight.requires_grad_(True)
        for k, window in enumerate(tqdm(windows, desc="gradients (backward)", unit="window", disable=not progress)):
            ids = window[None].to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise SvdllmError(f"Non-finite loss on calibration window {k} during the gradient pass; "
                                  "use --dtype float32.")
            loss.backward()
            for name, m in modules.items():
                rows[name] += m.weight.grad.detach().to(torch.float64).pow(2).sum(1).cpu()
                m.weight.grad = None
    finally:
        for h in handles:
            h.remove()
        for p, flag in previous.items():
            p.requires_grad_(flag)
        model.train(was_training)
    rows, outputs = distributed.all_reduce_sum(rows), distributed.all_reduce_sum(outputs)
    if grams is not None:
        grams = distributed.all_reduce_sum(grams)
    n_windows = distributed.sum_int(len(windows))
    for name in modules:
        if not (torch.isfinite(rows[name]).all() and torch.isfinite(outputs[name]).all()):
            raise SvdllmError(f"The gradients of {name} overflowed to inf/NaN; use --dtype float32.")
    return GradientStats(rows, outputs, n_windows, grams)


def fisher_rows(model: nn.Module, windows: torch.Tensor, progress: bool = True) -> dict[str, torch.Tensor]:
    """name -> Σ over windows of Σ_j (∂L/∂W_ij)² (FWSVD's row Fisher)."""
    return gradient_stats(model, windows, progress).rows
