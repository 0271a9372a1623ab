"""The modules svdllm puts into a model: LowRankLinear replaces a dense nn.Linear by two thin ones, y = W_u (W_v x) + b.
Every part that builds, saves, loads, caches or times a compressed model imports it from here."""
from __future__ import annotations

import torch
from torch import nn

from ..models.families import set_submodule


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, w_u: torch.Tensor, w_v: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        out_features, rank = w_u.shape
        module = cls(w_v.shape[1], out_features, rank, bias=bias is not None, device=w_u.device, dtype=w_u.dtype)
        with torch.no_grad():
            module.u.weight.copy_(w_u)
            module.v.weight.copy_(w_v)
            if bias is not None:
                module.u.bias.copy_(bias)
        return module

    @torch.no_grad()
    def balance_(self) -> "LowRankLinear":
        """Rescale each rank-1 component so that ‖W_u[:, k]‖ = ‖W_v[k, :]‖; the product W_u·W_v is unchanged.

        A method splits the product wherever its whitening leaves it: un-whitening by L_g⁻ᵀ (kfac-svd) makes W_u
        about 10⁵ times larger than W_v on SmolLM2, by S⁻¹ (svd-llm) about 50 times. Whatever sees each factor on
        its own scale (Adam's per-element steps in LoRA) sees the split, though the model does not.
        """
        u, v = self.u.weight, self.v.weight
        nu, nv = u.double().norm(dim=0), v.double().norm(dim=1)
        ok = (nu > 0) & (nv > 0)  # a dead component keeps its scale (and stays dead)
        c = torch.where(ok, nv / torch.where(ok, nu, 1.0), 1.0).sqrt()
        u.copy_(u.double() * c)
        v.copy_(v.double() / c[:, None])
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def swap_in(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, nn.Module]:
    """Replace each named linear by LowRankLinear(W_u, W_v); returns the replaced modules for `swap_back`."""
    originals = {}
    for name, (w_u, w_v) in factors.items():
        dense = model.get_submodule(name)
        bias = dense.bias.detach() if dense.bias is not None else None
        set_submodule(model, name, LowRankLinear.from_factors(w_u, w_v, bias))
        originals[name] = dense
    return originals


def swap_back(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    for name, module in originals.items():
        set_submodule(model, name, module)
