"""Weight-only quantization of the factors (SVD-LLM Table 7: low-rank compression stacked with quantization).

torchao does the work: `quantize_` swaps the weights of the decoder layers' linears (both factors of every
LowRankLinear, and any linear left dense) for int8 per-channel or int4 grouped tensors; embeddings, norms and the
LM head stay in the model's dtype, as in the papers' GPTQ comparison. `method="rtn"` is round-to-nearest (no
calibration data); `method="gptq"` quantizes with error feedback through each linear's input Gram (gptq.py), a
decoder layer at a time on the quantized model's own inputs, and stores its codes in the same torchao tensor. Both
apply equally to a dense model, which is the comparison that matters (the same memory spent on ranks or on bits).

On disk torchao's tensors are flattened into plain safetensors entries (`_weight_qdata`, `_weight_scale`, ...) with
torchao's own metadata, and rebuilt on load. torchao's CPU int4 layout keeps each 4-bit value in an int8 byte in
memory; on disk two values share a byte (`pack_int4`), so an int4 file really is about half an int8 one.
`quantization_report` gives the bits of the format and of the in-memory layout.
"""
from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from ..calibration.layerwise import InputStatistics
from ..calibration.walk import Step, Walk
from ..errors import SvdllmError
from ..nn.low_rank import LowRankLinear
from .gptq import Grid, gptq_codes, gptq_low_rank_codes
from .pricing import quant_group as _group

log = logging.getLogger(__name__)
SCHEMES = {"int8": "int8 weights, one scale per output channel", "int4": "int4 weights, one scale per group of "
           "input channels (default 32; smaller where the input size is not a multiple)",
           "int3": "int3 weights, grouped as int4 (stored in 4-bit nibbles on disk)"}
BITS = {"int8": 8, "int4": 4, "int3": 3}
METHODS = {"rtn": "round-to-nearest, no calibration data (int8/int4: torchao's symmetric grid; int3: an asymmetric "
                  "min-max grid)",
           "gptq": "error feedback through each linear's input Gram (GPTQ, columns in act-order, static groups, an "
                   "asymmetric grid with a clipping search), layer by layer on the quantized model's own inputs; a "
                   "factor pair's W_u also takes up W_v's error"}


def _torchao():
    logging.getLogger("torchao").setLevel(logging.ERROR)  # it logs every GPU kernel library a CPU build lacks
    from ..utils.extras import require

    require("torchao", "Quantization")
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    return quantize_, Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup, PerAxis


def _targets(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers (the factors of a LowRankLinear are two)."""
    from ..models.families import family_of, find_layers

    try:
        layers = family_of(model).layers
    except SvdllmError:  # a dense model of a type that is not listed
        layers = find_layers(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(layers + ".")}


def is_quantized(tensor: torch.Tensor) -> bool:
    return type(tensor) not in (torch.Tensor, nn.Parameter)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str, group_size: int = 32, method: str = "rtn",
                   windows: torch.Tensor | None = None, progress: bool = True, bits_of: dict | None = None) -> dict:
    """Quantize the decoder layers' linear weights in place; returns what was done (for the manifest). `gptq` needs
    calibration `windows` (token ids, N × L). `bits_of` (scheme "mixed", GPTQ): each linear's width by its full
    name, None where it stays float (the joint rank-and-bits allocation's choice)."""
    if bits_of is not None:
        if method != "gptq" or scheme != "mixed":
            raise SvdllmError("Per-matrix widths are quantized by GPTQ, as scheme 'mixed'.")
        if any(b not in (None, *BITS.values()) for b in bits_of.values()):
            raise SvdllmError(f"Per-matrix widths must be among {sorted(BITS.values())} (or None: float).")
    elif scheme not in SCHEMES:
        raise SvdllmError(f"Unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}.")
    if method not in METHODS:
        raise SvdllmError(f"Unknown quantization method {method!r}; choose one of {', '.join(METHODS)}.")
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
    if method == "gptq":
        if windows is None:
            raise SvdllmError("GPTQ needs calibration windows (svdllm quantize --method gptq reads --calib-dataset).")
        return _gptq_model(model, scheme, group_size, windows, progress, bits_of)
    groups = {}
    if scheme == "int3":  # torchao has no int3 round-to-nearest on the CPU: an asymmetric min-max grid, as GPTQ's
        # without its clipping search or error feedback
        from .gptq import rtn_codes

        for name, module in targets.items():
            groups[name] = g = _group(module.in_features, group_size)
            _store(module, rtn_codes(module.weight, Grid(3, g)), 3, g)
        return _info(scheme, "rtn", group_size, groups)
    for name, module in targets.items():
        if scheme == "int8":
            config, groups[name] = Int8Config(), None
        else:
            g = _group(module.in_features, group_size)
            groups[name] = g
            config = IntxConfig(weight_dtype=torch.int4, granularity=PerGroup(g) if g else PerAxis(0))
        quantize_(module, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return _info(scheme, "rtn", group_size, groups)


def quantize_and_report(model: nn.Module, scheme: str, group_size: int = 32, method: str = "rtn",
                        windows: torch.Tensor | None = None, calibration: dict | None = None, progress: bool = True,
                        bits_of: dict | None = None) -> dict:
    """quantize_model, and the manifest's record of it: what was done, its wall time, the calibration it read
    (`calibration`, when `windows` are given) and quantization_report's bits and bytes."""
    t0 = time.perf_counter()
    info = quantize_model(model, scheme, group_size, method, windows, progress, bits_of)
    info["quantize_s"] = time.perf_counter() - t0
    if windows is not None and calibration is not None:
        info["calibration"] = calibration
    info.update(quantization_report(model, scheme))
    return info


def _info(scheme: str, method: str, group_size: int, groups: dict) -> dict:
    per_channel = sum(g is None for g in groups.values()) if scheme != "int8" else len(groups)
    return {"scheme": scheme, "method": method, "group_size": group_size if scheme != "int8" else None,
            "matrices": len(groups), "per_channel_matrices": per_channel,
            "groups": {k: v for k, v in groups.items() if v != group_size}}


def _store(linear: nn.Linear, q, bits: int, group: int | None) -> None:
    """The codes of `q` (gptq.Quantized) as the linear's weight, in torchao's tensor for grouped integer weights
    (the same one its round-to-nearest int4 makes): saved, loaded and run by the same paths."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    offset = 2 ** (bits - 1)  # codes [0, 2^b − 1] -> torchao's signed range [−2^(b−1), 2^(b−1) − 1]
    weight = IntxUnpackedToInt8Tensor(
        (q.codes - offset).to(torch.int8), q.scale.to(torch.float32), (q.zero - offset).to(torch.int8),
        getattr(torch, f"int{bits}"), (1, group or linear.in_features), torch.float32, None)
    linear.weight = nn.Parameter(weight, requires_grad=False)


def _gptq_model(model: nn.Module, scheme: str, group_size: int, windows: torch.Tensor, progress: bool,
                bits_of: dict | None = None) -> dict:
    """GPTQ a decoder layer at a time (the GPTQLayers processor on the forward walk). `bits_of`: the width of each
    linear by its full name (None: it stays float) instead of the scheme's."""
    processor = GPTQLayers(BITS[scheme] if bits_of is None else None, group_size, bits_of)
    Walk(model, windows, progress=progress).run(processor)
    info = _info(scheme, "gptq", group_size, processor.groups)
    if bits_of is not None:
        info["bits"] = {k: v for k, v in bits_of.items()}
    return info


class GPTQLayers(InputStatistics):
    """GPTQ as a processor of the forward walk: each layer's input Grams are taken with the layers before it already
    quantized (the sequential mode), then every linear of the layer is quantized on its group's Gram, at `bits` or at
    its own width in `bits_of` (None there: it stays float). A factor pair's W_u also takes up W_v's error."""

    def __init__(self, bits: int | None, group_size: int, bits_of: dict | None = None):
        super().__init__(sequential=True)
        self.bits, self.group_size, self.bits_of = bits, group_size, bits_of
        self.groups: dict = {}

    def use(self, step: Step, stats) -> None:
        family = step.family
        for name in family.linear_names:
            module, full = step.layer.get_submodule(name), family.linear_name(step.i, name)
            bits = self.bits if self.bits_of is None else self.bits_of.get(full)
            if bits is None:
                continue

            def grouped(n: int) -> int | None:
                return None if bits == 8 else _group(n, self.group_size)

            gram = stats.grams[family.group_of[name]]
            if isinstance(module, LowRankLinear):
                gv, gu = grouped(module.in_features), grouped(module.rank)
                q_u, q_v = gptq_low_rank_codes(module.u.weight, module.v.weight, gram, Grid(bits, gv, clip=True),
                                               grid_u=Grid(bits, gu, clip=True))
                _store(module.v, q_v, bits, gv)
                _store(module.u, q_u, bits, gu)
                self.groups[f"{full}.v"], self.groups[f"{full}.u"] = gv, gu
            else:
                g = grouped(module.in_features)
                _store(module, gptq_codes(module.weight, gram, Grid(bits, g, clip=True)), bits, g)
                self.groups[full] = g


def value_bits(weight) -> int | None:
    """Bits per value of a quantized (torchao) weight; None for a width svdllm does not make."""
    return {torch.int8: 8, torch.int4: 4, torch.int3: 3}.get(getattr(weight, "target_dtype", torch.int8))


def quantization_report(model: nn.Module, scheme: str | None) -> dict:
    """Bits per quantized weight: the format's (value bits + its scales/zero points), and as held in memory by
    torchao's layout; and the bytes of all the decoder layers' linears in the format (float ones at their dtype)."""
    targets = _targets(model)
    weights = values = memory = extra = 0
    linear_bits = 0
    for m in targets.values():
        w = m.weight
        n = math.prod(w.shape)
        if not is_quantized(w):
            linear_bits += n * w.element_size() * 8
            continue
        weights += n
        values += n * value_bits(w)
        for attr in ("qdata", "scale", "zero_point"):
            t = getattr(w, attr, None)
            if t is not None:
                memory += t.numel() * t.element_size() * 8
                if attr != "qdata":
                    extra += t.numel() * t.element_size() * 8
    linear_bits += values + extra
    if not weights:
        bits = next(model.parameters()).element_size() * 8
        return {"quantized_weights": 0, "bits_per_weight": bits, "memory_bits_per_weight": bits,
                "linear_bytes": linear_bits // 8}
    return {"quantized_weights": weights, "bits_per_weight": (values + extra) / weights,
            "memory_bits_per_weight": memory / weights, "linear_bytes": linear_bits // 8}
