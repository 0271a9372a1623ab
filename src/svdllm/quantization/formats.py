"""How quantized weights go to disk: torchao's tensors flattened into plain safetensors entries with torchao's own
metadata, rebuilt on load; 4-bit (and 3-bit) values packed two per byte, so an int4 file really is about half an
int8 one (torchao's CPU layout keeps each in an int8 byte in memory)."""
from __future__ import annotations

import json
import math

import torch

from ..errors import SvdllmError
from .quantize import _torchao, is_quantized


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
        if is_quantized(v) and getattr(v, "target_dtype", None) in (torch.int4, torch.int3):  # [-8, 7] holds int3
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
