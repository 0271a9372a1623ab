"""Weight-only quantization of the factors (SVD-LLM Table 7: low-rank compression stacked with quantization).

torchao does the work: `quantize_` swaps the weights of the decoder layers' linears (both factors of every
LowRankLinear, and any linear left dense) for int8 per-channel or int4 grouped tensors; embeddings, norms and the
LM head stay in the model's dtype, as in the papers' GPTQ comparison. This is round-to-nearest, not GPTQ: no
calibration data, so it applies equally to a dense model, which is the comparison that matters (the same memory
spent on ranks or on bits).

On disk torchao's tensors are flattened into plain safetensors entries (`_weight_qdata`, `_weight_scale`, ...) with
torchao's own metadata, and rebuilt on load. torchao's CPU int4 layout keeps each 4-bit value in an int8 byte in
memory; on disk two values share a byte (`pack_int4`), so an int4 file really is about half an int8 one.
`quantization_report` gives the bits of the format and of the in-memory layout.
"""
from __future__ import annotations

import json
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
    from .extras import require

    require("torchao", "Quantization")
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
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
    """Bits per quantized weight: the format's (value bits + its scales/zero points), and as held in memory by torchao's layout."""
    targets = _targets(model)
    weights = sum(math.prod(m.weight.shape) for m in targets.values())
    if not scheme:
        bits = next(model.parameters()).element_size() * 8
        return {"quantized_weights": 0, "bits_per_weight": bits, "memory_bits_per_weight": bits}
    value_bits = 8 if scheme == "int8" else 4
    memory = extra = 0
    for m in targets.values():
        w = m.weight
        for attr in ("qdata", "scale", "zero_point"):
            t = getattr(w, attr, None)
            if t is not None:
                memory += t.numel() * t.element_size() * 8
                if attr != "qdata":
                    extra += t.numel() * t.element_size() * 8
    return {"quantized_weights": weights, "bits_per_weight": value_bits + extra / max(weights, 1),
            "memory_bits_per_weight": memory / max(weights, 1)}


PACKED_KEY = "svdllm_int4_packed"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] -> uint8 bytes holding two of them each (low nibble first)."""
    if q.dtype != torch.int8 or (q.numel() and (int(q.min()) < -8 or int(q.max()) > 7)):
        raise SvdllmError("int4 weights outside [-8, 7]; the quantized tensor is not int4.")
    u = (q.reshape(-1).to(torch.int16) & 0x0F).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(-1)[: math.prod(shape)]
    q = nibbles.to(torch.int8)
    return torch.where(q >= 8, q - 16, q).reshape(shape)


def flatten_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """Plain tensors and metadata for safetensors (None when nothing is quantized); int4 values packed two per byte."""
    if not any(is_quantized(v) for v in state.values()):
        return state, None
    _torchao()
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict(state)
    packed = {}
    for name, v in state.items():
        if is_quantized(v) and getattr(v, "target_dtype", None) == torch.int4:
            fqn, attr = name.rsplit(".", 1)
            key = f"{fqn}._{attr}_qdata"  # torchao's name for the values of a flattened tensor
            packed[key] = list(tensors[key].shape)
            tensors[key] = pack_int4(tensors[key])
    if packed:
        metadata[PACKED_KEY] = json.dumps(packed)
    return tensors, metadata


def unflatten_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    _torchao()
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    tensors = dict(tensors)
    for key, shape in json.loads(metadata.get(PACKED_KEY, "{}")).items():
        tensors[key] = unpack_int4(tensors[key], shape)
    metadata = {k: v for k, v in metadata.items() if k != PACKED_KEY}
    state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    return {**leftover, **state}
