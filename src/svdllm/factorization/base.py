"""The factorization interface: a method turns a weight matrix and its calibration statistics into a
decomposition from which factors of any rank are read off, with the spectrum whose tail is the truncation loss."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Decomposition:
    """W ≈ W_u · W_v at any rank r, with W_u = left[:, :r] · diag(√s_r) and W_v = diag(√s_r) · right[:r].

    `s` are the singular values of the (possibly whitened) matrix the method decomposed, in descending order;
    for truncation-aware methods the loss of truncating to rank r is √(Σ_{i≥r} s_i²) exactly.
    `left` (m × k) and `right` (k × n) are already un-whitened, so reading factors off is only slicing.
    """

    left: torch.Tensor
    s: torch.Tensor
    right: torch.Tensor
    info: dict = field(default_factory=dict)  # e.g. the jitter a non-positive-definite Gram needed

    @property
    def max_rank(self) -> int:
        return int(self.s.numel())

    def factors(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        if rank > self.left.shape[1]:  # a stored decomposition keeps only the components a factor pair can use
            raise ValueError(f"rank {rank} asked of a decomposition that keeps {self.left.shape[1]} components")
        root = self.s[:rank].sqrt()
        w_u = self.left[:, :rank] * root
        w_v = root[:, None] * self.right[:rank]
        return w_u.to(dtype).contiguous(), w_v.to(dtype).contiguous()

    def truncation_loss(self, rank: int) -> float:
        """The loss the method's objective assigns to truncating at `rank`: √(sum of discarded s²)."""
        return float(self.s[rank:].double().pow(2).sum().sqrt())


class Method:
    """A factorization method. Subclasses set `name`, `summary` and implement `decompose`."""

    name: str = ""
    summary: str = ""
    needs: tuple[str, ...] = ()  # statistics beyond the weight ("inputs": XᵀX and Σ|x| of the layer's input)

    @classmethod
    def options(cls) -> dict:
        """Option name -> help, settable with --method-arg NAME=VALUE."""
        return {}

    def decompose(self, weight: torch.Tensor, stats) -> Decomposition:
        """Factorize `weight` (m × n, float64) given `stats` (a LinearStats, or None when `needs` is empty)."""
        raise NotImplementedError
