"""Factorization: *how* a weight matrix becomes two low-rank factors (the rank itself comes from allocation)."""
from ..errors import SvdllmError
from .base import Decomposition, Method
from .lowrank import LowRankLinear
from .methods import ASVD, FWSVD, SVDLLM, DipSVD, PlainSVD, SVDLLMV2

METHODS: dict[str, Method] = {m.name: m for m in (PlainSVD(), FWSVD(), ASVD(), SVDLLM(), SVDLLMV2(), DipSVD())}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise SvdllmError(f"Unknown method {name!r}; available: {', '.join(METHODS)} (see `svdllm methods`).")
    return METHODS[name]


__all__ = ["Decomposition", "Method", "LowRankLinear", "METHODS", "get_method", "SVDLLM", "PlainSVD", "SVDLLMV2", "ASVD", "DipSVD", "FWSVD"]
