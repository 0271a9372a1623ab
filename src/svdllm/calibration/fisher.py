"""Fisher information of the weights from squared gradients of the language-model loss (FWSVD, Hsu et al. 2022).

Gradients need full forward and backward passes, so this is a pass of its own on the calibration windows. Only
the per-row sums Σ_j (∂L/∂W_ij)² are kept for each compressed linear: no per-token or per-element storage.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SvdllmError
from ..models.families import LINEAR_NAMES, family_of


def fisher_rows(model: nn.Module, windows: torch.Tensor, progress: bool = True) -> dict[str, torch.Tensor]:
    """name -> Σ over windows of Σ_j (∂L/∂W_ij)² for every compressed linear (float64, one value per output row)."""
    layers = family_of(model).decoder_layers(model)
    targets = {f"model.layers.{i}.{n}": layer.get_submodule(n).weight
               for i, layer in enumerate(layers) for n in LINEAR_NAMES}
    previous = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    rows = {name: torch.zeros(w.shape[0], dtype=torch.float64) for name, w in targets.items()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in targets.values():
            w.requires_grad_(True)
        for k, window in enumerate(tqdm(windows, desc="fisher (backward)", unit="window", disable=not progress)):
            ids = window[None].to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise SvdllmError(f"Non-finite loss on calibration window {k} during the gradient pass; "
                                  "use --dtype float32.")
            loss.backward()
            for name, w in targets.items():
                rows[name] += w.grad.detach().to(torch.float64).pow(2).sum(1).cpu()
                w.grad = None
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return rows
