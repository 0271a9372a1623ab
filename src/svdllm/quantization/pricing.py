"""What a quantized weight costs as svdllm stores it: the values, and a float32 scale and an int8 zero point per row
and group of input columns. The joint rank-and-bits allocation prices its choices with these, and the quantizer
groups the columns the same way, so the bytes planned are the bytes written."""
from __future__ import annotations

FLOAT_BITS = 32  # an unquantized weight: float32, as the quantizer computes
OVERHEAD_BITS = 40  # a float32 scale and an int8 zero point per group of a row


def quant_group(in_features: int, group_size: int) -> int | None:
    """The largest power-of-two group ≤ group_size that divides the input size (None: one scale per row)."""
    g = group_size
    while g >= 8:
        if in_features % g == 0:
            return g
        g //= 2
    return None


def weight_bits(out_features: int, in_features: int, bits: int, group_size: int = 32) -> int:
    """Bits an out × in weight takes at `bits` as svdllm stores it: the values, and a float32 scale and an int8 zero
    point per row and group (int8: per row; int4/int3: groups of `group_size`, or quant_group's fallback)."""
    group = None if bits == 8 else quant_group(in_features, group_size)
    groups = 1 if group is None else in_features // group
    return out_features * (in_features * bits + groups * OVERHEAD_BITS)
