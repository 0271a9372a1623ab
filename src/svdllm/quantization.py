"""Weight-only quantization of the factors (SVD-LLM Table 7: low-rank compression stacked with quantization).

torchao does the work: `quantize_` swaps the weights of the decoder layers' linears (both factors of every
LowRankLinear, and any linear left dense) for int8 per-channel or int4 grouped tensors; embeddings, norms and the
LM head stay in the model's dtype, as in the papers' GPTQ comparison. This is round-to-nearest, not GPTQ: no
calibration data, so it applies equally to a dense model, which is the comparison that matters (the same memory
spent on ranks or on bits).

On disk torchao's tensors are flattened into plain safetensors entries (`_weight_qdata`, `_weight_scale`, ...) with
torchao's own metadata, and rebuilt on load. torchao's CPU int4 layout keeps each 4-bit value in an int8 byte, so
int4 halves the arithmetic precision, not yet the bytes on disk: `quantization_report` gives both.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .errors import SvdllmError

log = logging.getLogger(__name__)
SCHEMES = {"int8": "int8 weights, one scale per output channel", "int4": "int4 weights, one scale per group of "
           "input channels (default 32; smaller where the input size is not a multiple)"}


def _torchao():
    logging.getLogger("torchao").setLevel(logging.ERROR)  # it logs every GPU kernel library a CPU build lacks
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup
    except ImportError as e:
        raise SvdllmError(f"Quantization needs torchao (pip install torchao): {e}") from e
    return quantize_, Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup, PerAxis


def _targets(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"}


def _group(in_features: int, group_size: int) -> int | None:
    """The largest power-of-two group ≤ group_size that divides the input size (None: per channel)."""
    g = group_size
    while g >= 8:
        if in_features % g == 0:
            return g
        g //= 2
    return None


def is_quantized(tensor: torch.Tensor) -> bool:
    return type(tensor) not in (torch.Tensor, nn.Parameter)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str, group_size: int = 32) -> dict:
    """Quantize the decoder layers' linear weights in place; returns what was done (for the manifest)."""
    if scheme not in SCHEMES:
        raise SvdllmError(f"Unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}.")
    if group_size < 8 or group_size & (group_size - 1):
        raise SvdllmError(f"--group-size must be a power of two ≥ 8, got {group_size}.")
    quantize_, Int8Config, IntxConfig, PerGroup, PerAxis = _torchao()
    targets = _targets(model)
    if not targets:
        raise SvdllmError("The model has no decoder-layer linears to quantize.")
    if any(is_quantized(m.weight) for m in targets.values()):
        raise SvdllmError("The model is already quantized.")
    if next(model.parameters()).dtype != torch.float32:
        model.float()  # torchao's CPU kernels and scales work from float32 weights
    groups = {}
    for name, module in targets.items():
        if scheme == "int8":
            config, groups[name] = Int8Config(), None
        else:
            g = _group(module.in_features, group_size)
            groups[name] = g
            config = IntxConfig(weight_dtype=torch.int4, granularity=PerGroup(g) if g else PerAxis(0))
        quantize_(module, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    per_channel = sum(g is None for g in groups.values()) if scheme == "int4" else len(groups)
    return {"scheme": scheme, "group_size": group_size if scheme == "int4" else None, "matrices": len(groups),
            "per_channel_matrices": per_channel, "groups": {k: v for k, v in groups.items() if v != group_size}}


def quantization_report(model: nn.Module, scheme: str | None) -> dict:
    """Bits per quantized weight: the format's (value bits + its scales/zero points), and as stored."""
    targets = _targets(model)
    weights = sum(math.prod(m.weight.shape) for m in targets.values())
    if not scheme:
        bits = next(model.parameters()).element_size() * 8
        return {"quantized_weights": 0, "bits_per_weight": bits, "stored_bits_per_weight": bits}
    value_bits = 8 if scheme == "int8" else 4
    stored = extra = 0
    for m in targets.values():
        w = m.weight
        for attr in ("qdata", "scale", "zero_point"):
            t = getattr(w, attr, None)
            if t is not None:
                stored += t.numel() * t.element_size() * 8
                if attr != "qdata":
                    extra += t.numel() * t.element_size() * 8
    return {"quantized_weights": weights, "bits_per_weight": value_bits + extra / max(weights, 1),
            "stored_bits_per_weight": stored / max(weights, 1)}


def flatten_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """Plain tensors and metadata for safetensors (None when nothing is quantized)."""
    if not any(is_quantized(v) for v in state.values()):
        return state, None
    _torchao()
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    return flatten_tensor_state_dict(state)


def unflatten_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    _torchao()
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    return {**leftover, **state}
