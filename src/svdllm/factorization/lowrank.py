"""LowRankLinear: the module that replaces a dense nn.Linear by two thin ones, y = W_u (W_v x) + b."""
from __future__ import annotations

import torch
from torch import nn


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
