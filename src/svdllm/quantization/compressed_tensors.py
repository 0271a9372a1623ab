"""A quantized model in compressed-tensors' format, which plain transformers (and vLLM, llm-compressor) read.

svdllm keeps quantized weights as torchao tensors, which only `svdllm.load` rebuilds from disk. compressed-tensors'
`pack-quantized` format holds the same numbers: each linear's integer codes packed into int32 words, its scales and
(asymmetric grids, as GPTQ's) zero points, described in config.json's `quantization_config` by one scheme per
(bits, group size, symmetry). Both dequantize as (q − z)·s, so the export changes how the codes are stored, not
their values. transformers decompresses the weights on load; a low-rank model also needs the generated modeling
file (trust_remote_code), which builds the W_u·W_v pairs the quantization config then targets by name.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from ..errors import SvdllmError
from ..utils.extras import require

# Symmetric grids (round-to-nearest) pack their codes into int32 words. Asymmetric ones (GPTQ's min-max grid) keep
# one code per int8 byte: transformers 5.24 with compressed-tensors 0.20 cannot load a packed asymmetric
# checkpoint (it expects the zero points unpacked; llm-compressor issue #1618), and the unpacked codes are the same.
PACKED, UNPACKED = "pack-quantized", "int-quantized"


def _grid(weight) -> tuple[int, int | None, bool]:
    """(bits, group size or None for one scale per output row, symmetric) of a torchao weight."""
    from .quantize import value_bits

    bits = value_bits(weight)
    if bits is None:
        raise SvdllmError(f"compressed-tensors export: a weight of type {getattr(weight, 'target_dtype', None)} "
                          "has no integer grid svdllm knows.")
    group = int(weight.block_size[-1])
    zero = weight.zero_point
    return bits, None if group == weight.shape[-1] else group, bool(zero is None or not zero.any())


def _schemes(grids: dict[str, tuple]) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    by_grid = defaultdict(list)
    for name, grid in grids.items():
        by_grid[grid].append(name)
    schemes = {}
    for k, ((bits, group, symmetric), names) in enumerate(sorted(by_grid.items(), key=lambda kv: str(kv[0]))):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, dynamic=False,
                                strategy="group" if group else "channel", group_size=group)
        # one regular expression per scheme: the names it covers, exactly
        targets = ["re:^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"]
        schemes[f"group_{k}"] = QuantizationScheme(targets=targets, weights=args,
                                                   format=PACKED if symmetric else UNPACKED)
    return schemes


@torch.no_grad()
def to_compressed_tensors(model: nn.Module):
    """Swap the model's torchao weights for compressed-tensors' packed parameters, in place; returns the
    ModelCompressor whose `update_config(directory)` writes the quantization config beside the weights."""
    require("compressed_tensors", "The compressed-tensors export")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    from .quantize import is_quantized

    quantized = {name: m for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and is_quantized(m.weight)}
    if not quantized:
        raise SvdllmError("The model has no quantized weights to export (run `svdllm quantize` first).")
    grids = {name: _grid(m.weight) for name, m in quantized.items()}
    codes = {}
    for name, m in quantized.items():
        w = m.weight
        codes[name] = (w.dequantize().float(), w.scale.float(), w.zero_point)
        m.weight = nn.Parameter(codes[name][0], requires_grad=False)  # plain float: what compressed-tensors starts from
    schemes = _schemes(grids)
    formats = {scheme.format for scheme in schemes.values()}
    config = QuantizationConfig(config_groups=schemes, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                                ignore=[], quantization_status="frozen")
    apply_quantization_config(model, config, show_progress=False)
    for name, m in quantized.items():
        dense, scale, zero = codes[name]
        m.weight_scale.data = scale.reshape(m.weight_scale.shape).to(m.weight_scale.dtype)
        if hasattr(m, "weight_zero_point"):
            z = torch.zeros_like(scale, dtype=torch.int8) if zero is None else zero
            m.weight_zero_point.data = z.reshape(m.weight_zero_point.shape).to(m.weight_zero_point.dtype)
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(model)
    for name, m in quantized.items():  # the packed codes must be the ones svdllm stored: re-rounding is exact
        _check(name, m, grids[name], codes[name])
    return compressor


def _check(name: str, module: nn.Module, grid: tuple, code: tuple) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits, group, symmetric = grid
    dense = code[0]
    rows, groups = module.weight_scale.shape
    packed = hasattr(module, "weight_packed")
    q = unpack_from_int32(module.weight_packed, bits, dense.shape) if packed else module.weight
    zero = getattr(module, "weight_zero_point", None)
    if zero is not None and not symmetric:
        zero = unpack_from_int32(zero, bits, torch.Size([rows, groups]), packed_dim=0) if packed else zero
        q = q.float() - (zero.repeat_interleave(group, dim=1) if group else zero).float()
    scale = module.weight_scale.float()
    rebuilt = q.float() * (scale.repeat_interleave(group, dim=1) if group else scale)
    if not torch.equal(rebuilt, dense):
        raise SvdllmError(f"compressed-tensors export: {name} does not rebuild its quantized weight exactly "
                          f"(largest difference {float((rebuilt - dense).abs().max()):.3g}).")
