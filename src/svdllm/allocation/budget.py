"""The parameter budget and the bookkeeping every allocator shares.

R is the fraction of the compressed matrices' parameters removed (PROTOCOL.md): an m×n matrix at rank r keeps
r(m+n) parameters, or m·n if it stays dense. An allocator's answer is a rank per matrix (None = dense).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from ..errors import SvdllmError

TOLERANCE = 0.005  # allowed |kept − budget| as a fraction of the compressed matrices' dense parameters


@dataclass(frozen=True)
class MatrixInfo:
    name: str  # the linear's module name in the model
    out_features: int
    in_features: int
    layer: int = 0  # the index of its decoder layer

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def kind(self) -> str:
        """The matrix type across layers, e.g. self_attn.q_proj."""
        parts = self.name.split(".")
        return ".".join(parts[-2:]) if len(parts) >= 2 else self.name

    @property
    def is_attention(self) -> bool:
        return "attn" in self.name

    def lowrank_params(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)

    def cost(self, rank: int | None) -> int:
        return self.dense_params if rank is None else self.lowrank_params(rank)

    def dense_rank(self, multiple: int = 1) -> int:
        """The largest rank (a multiple of `multiple`) whose factors are still smaller than the dense matrix."""
        r = (self.dense_params - 1) // (self.out_features + self.in_features)
        return r - r % multiple


def budget(matrices: list[MatrixInfo], ratio: float) -> float:
    return (1.0 - ratio) * sum(m.dense_params for m in matrices)


def param_counts(matrices: list[MatrixInfo], ranks: dict[str, int | None]) -> dict:
    dense = sum(m.dense_params for m in matrices)
    kept = sum(m.cost(ranks[m.name]) for m in matrices)
    return {"linear_dense": dense, "linear_kept": kept, "achieved_ratio": 1.0 - kept / dense}


def check_feasible(matrices: list[MatrixInfo], ratio: float, min_rank: int) -> None:
    floor_cost = sum(m.lowrank_params(min_rank) for m in matrices)
    if floor_cost > budget(matrices, ratio):
        worst = 1.0 - floor_cost / sum(m.dense_params for m in matrices)
        raise SvdllmError(
            f"Ratio {ratio} cannot be met: even rank {min_rank} in every matrix keeps more than the budget "
            f"(the largest reachable ratio here is {worst:.3f}); use a lower --ratio or a smaller --rank-multiple.")


def fit_to_budget(matrices: list[MatrixInfo], exact: dict[str, float], ratio: float,
                  multiple: int = 1) -> dict[str, int | None]:
    """Integer ranks (multiples of `multiple`) close to the real-valued `exact` ranks that fill the budget.

    Ranks are rounded down, clamped to [multiple, dense], then the matrices furthest below their exact rank
    grow one step at a time while the budget allows: the leftover is below one step of the smallest matrix,
    and a clamp in one matrix is re-balanced over the others.
    """
    check_feasible(matrices, ratio, multiple)
    target = budget(matrices, ratio)
    ranks: dict[str, int | None] = {}
    for m in matrices:
        r = exact[m.name]
        if not math.isfinite(r):
            raise SvdllmError(f"The allocator produced a non-finite rank for {m.name}: its statistics contain NaN/inf.")
        top = m.dense_rank(multiple)
        dense = r * (m.out_features + m.in_features) >= m.dense_params or top < multiple
        ranks[m.name] = None if dense else min(top, max(multiple, int(r // multiple) * multiple))
    kept = sum(m.cost(ranks[m.name]) for m in matrices)
    # dense matrices over budget (exact rank near full) shrink first, furthest above their exact rank first
    while kept > target:
        shrinkable = [m for m in matrices if ranks[m.name] is None or ranks[m.name] > multiple]
        if not shrinkable:
            break
        m = max(shrinkable, key=lambda m: ((ranks[m.name] or m.dense_rank(multiple) + multiple) - exact[m.name],
                                           m.name))
        new = m.dense_rank(multiple) if ranks[m.name] is None else ranks[m.name] - multiple
        kept += m.cost(new) - m.cost(ranks[m.name])
        ranks[m.name] = new
    # then grow the ranks furthest below their target while a step fits
    heap = [(-(exact[m.name] - ranks[m.name]) / multiple, m.name, i) for i, m in enumerate(matrices)
            if ranks[m.name] is not None]
    heapq.heapify(heap)
    while heap:
        _, name, i = heapq.heappop(heap)
        m = matrices[i]
        new = ranks[name] + multiple
        if new > m.dense_rank(multiple):
            continue
        step = m.cost(new) - m.cost(ranks[name])
        if kept + step > target:
            continue
        kept += step
        ranks[name] = new
        heapq.heappush(heap, (-(exact[name] - new) / multiple, name, i))
    return ranks


def exact_rank(m: MatrixInfo, keep: float) -> float:
    """The real-valued rank that keeps the fraction `keep` of the matrix's parameters."""
    return keep * m.dense_params / (m.out_features + m.in_features)


def greedy(units: list[list[tuple[float, float, object]]], target: float) -> list[int]:
    """Choose one point (cost, gain, state) per unit, costs ascending within a unit, maximising the total gain
    with the total cost ≤ target: the budget goes to the steepest segments of each unit's upper concave hull
    first (the exact optimum of the Lagrangian relaxation); where a segment does not fit whole, the unit takes the
    point of most gain among its own that fit and stops."""
    chosen = [0] * len(units)
    kept = sum(pts[0][0] for pts in units)
    hulls = [upper_hull(pts) for pts in units]
    heap = [(-(units[u][h[0]][1] - units[u][0][1]) / max(units[u][h[0]][0] - units[u][0][0], 1e-30), u, 0)
            for u, h in enumerate(hulls) if h]
    heapq.heapify(heap)
    while heap:
        _, u, j = heapq.heappop(heap)
        pts, cur = units[u], chosen[u]
        nxt = hulls[u][j]
        if kept + pts[nxt][0] - pts[cur][0] <= target:
            kept += pts[nxt][0] - pts[cur][0]
            chosen[u] = nxt
            if j + 1 < len(hulls[u]):
                a, b = pts[nxt], pts[hulls[u][j + 1]]
                heapq.heappush(heap, (-(b[1] - a[1]) / max(b[0] - a[0], 1e-30), u, j + 1))
        else:
            fits = [k for k in range(cur + 1, nxt) if kept + pts[k][0] - pts[cur][0] <= target]
            # the point of most gain among those (the costliest, where gain grows with cost as it does with rank
            # alone; a joint rank-and-width unit also holds cheaper points of more gain)
            best = max(fits, key=lambda k: (pts[k][1], k)) if fits else None
            if best is not None and pts[best][1] >= pts[cur][1]:
                kept += pts[best][0] - pts[cur][0]
                chosen[u] = best
    return chosen


def upper_hull(pts: list[tuple[float, float, object]]) -> list[int]:
    """Indices (after the first point) of the upper concave hull of (cost, gain) points sorted by cost."""
    hull = [0]
    for k in range(1, len(pts)):
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = pts[hull[-2]], pts[hull[-1]]
            if (y2 - y1) * (pts[k][0] - x1) <= (pts[k][1] - y1) * (x2 - x1):  # hull[-1] on or below the chord
                hull.pop()
            else:
                break
        hull.append(k)
    return hull[1:]
