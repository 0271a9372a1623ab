"""The modules a compressed model is made of: LowRankLinear (W ≈ W_u·W_v, swapped in for nn.Linear) and the
low-rank KV cache that stores W_v·x for low-rank k/v projections."""
from .low_rank import LowRankLinear, swap_back, swap_in

__all__ = ["LowRankLinear", "swap_back", "swap_in"]
