"""Factorization: *how* a weight matrix becomes two low-rank factors (the rank itself comes from allocation)."""
from ..errors import SvdllmError
from .base import Decomposition, Method
from ..nn.low_rank import LowRankLinear
from .methods import ASVD, FWSVD, SVDLLM, DipSVD, KFACSVD, PlainSVD, SVDLLMV2

METHODS: dict[str, Method] = {m.name: m for m in (PlainSVD(), FWSVD(), ASVD(), SVDLLM(), SVDLLMV2(), DipSVD(), KFACSVD())}


def get_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise SvdllmError(f"Unknown method {name!r}; available: {', '.join(METHODS)} (see `svdllm methods`).")
    if not options:
        return METHODS[name]
    known = type(METHODS[name]).options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SvdllmError(f"Method {name} has no option {', '.join(unknown)}; its options: "
                          f"{', '.join(known) or 'none'}.")
    try:
        return type(METHODS[name])(**options)
    except ValueError as e:
        raise SvdllmError(f"Bad option for method {name}: {e}.") from e


__all__ = ["Decomposition", "Method", "LowRankLinear", "METHODS", "get_method", "SVDLLM", "PlainSVD", "SVDLLMV2", "ASVD", "DipSVD", "FWSVD", "KFACSVD"]
