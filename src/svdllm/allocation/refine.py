"""The global allocator's search: KFAC predictions corrected per matrix type by measured truncations.

The quadratic (KFAC) model is a tangent: exact for small errors, but at high compression the nonlinearities after
some projections (softmax after q/k, the SiLU gate) make it under- or over-state the damage, and by matrix type. A
secant per type corrects it: the model's measured loss increase when every matrix of the type is truncated, over
the prediction for the same truncation. Round 0 measures it at the uniform ranks. The allocation then moves far
from uniform (q_proj cut to a tenth, v_proj kept almost whole), where the secant may differ: each of `refine`
further rounds measures it again at the previous allocation's own ranks and allocates anew; every allocation's loss
increase with all its matrices truncated at once is measured too, and the one with the lowest is kept.

The search sees the model only through `measure(ranks) -> loss`: the mean loss on the measurement windows with
the named matrices truncated at those ranks and every other one dense. Cost per round and ratio: (types + 1)
measurements, and one more of each at the end.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

from .budget import MatrixInfo

log = logging.getLogger(__name__)
Measure = Callable[[dict[str, int]], float]


def refined_allocation(allocate: Callable, matrices: list[MatrixInfo], ratios: list[float], spectra: dict,
                       multiple: int, measure: Measure, refine: int, start: dict | None = None) -> tuple[dict, dict]:
    """(ratio -> ranks, ratio -> what the search measured) with `refine` rounds of `allocate(matrices, ratio,
    spectra, multiple) -> ranks` (the global allocator's, on the rescaled spectra); round 0 measures at the `start`
    ranks of each ratio (default: the uniform ranks)."""
    from .allocators import Uniform

    kinds = sorted({m.kind for m in matrices})
    base = measure({})
    at = dict(start) if start is not None else {r: Uniform().allocate(matrices, r) for r in ratios}
    rounds: dict[str, list] = {str(r): [] for r in ratios}
    best: dict[float, tuple] = {}
    for k in range(refine + 2):
        last = k == refine + 1  # the last allocation's own loss only
        if last and refine == 0:  # one allocation, from the secant at the uniform ranks, not measured
            best = {r: (None, 0, at[r]) for r in ratios}
            break
        measured = _measured_losses(matrices, spectra, at, measure, base, types=not last, joint=k > 0)
        for r in ratios:
            if k > 0:  # `at` is the allocation round k - 1's scales made: keep the best by its measured loss
                rounds[str(r)][-1]["allocation_loss"] = measured[r]["joint"]
                if measured[r]["joint"] < best.get(r, (math.inf,))[0]:
                    best[r] = (measured[r]["joint"], k - 1, at[r])
            if last:
                continue
            scale = _type_scales(measured[r]["types"], kinds)
            rounds[str(r)].append({"measured_at": "uniform ranks" if k == 0 else f"round {k - 1}'s allocation",
                                   "types": measured[r]["types"], "scales": scale})
            log.info("ratio %.2f, round %d: measured/predicted loss per matrix type: %s", r, k,
                     ", ".join(f"{t} {v:.3g}" for t, v in scale.items()))
            scaled = _rescaled(spectra, matrices, scale)
            at[r] = allocate(matrices, r, scaled, multiple)
            rounds[str(r)][-1]["allocation_predicted"] = sum(
                float(scaled[m.name].loss[at[r][m.name]:].sum()) for m in matrices if at[r][m.name] is not None)
    info = {r: {"loss_scales": rounds[str(r)][best[r][1]]["scales"] if rounds[str(r)] else None, "base_loss": base,
                "chosen_round": best[r][1], "rounds": rounds[str(r)]} for r in ratios}
    return {r: best[r][2] for r in ratios}, info


def _measured_losses(matrices, spectra, ranks: dict, measure: Measure, base: float, types: bool, joint: bool) -> dict:
    """Per ratio: each matrix type's measured loss increase when that type alone is truncated at `ranks` and the
    KFAC prediction for it (sum of the discarded components' losses), and with `joint` the increase when every
    matrix is truncated at once."""
    out = {}
    for r in ranks:
        by_type = {}
        for kind in sorted({m.kind for m in matrices}) if types else []:
            truncated = {m.name: ranks[r][m.name] for m in matrices if m.kind == kind and ranks[r][m.name] is not None}
            predicted = sum(float(spectra[name].loss[rank:].sum()) for name, rank in truncated.items())
            if not truncated or predicted <= 0:
                continue
            by_type[kind] = {"measured": measure(truncated) - base, "predicted": predicted}
        out[r] = {"types": by_type}
        if joint:
            out[r]["joint"] = measure({m.name: ranks[r][m.name] for m in matrices if ranks[r][m.name] is not None}) - base
    return out


def _type_scales(types: dict, kinds) -> dict[str, float]:
    """measured / predicted per type, normalised to a geometric mean of 1 (only the relative scale between types
    matters to the allocation); a type whose measured change is at or below zero (noise on few windows), or that
    was not truncated, takes the measured types' geometric mean: its prediction keeps its place among theirs.
    (Not 1: the KFAC prediction and the measured loss are in different units, about 1000× apart on SmolLM2, so a
    raw 1 beside measured ratios would make the unmeasured types a thousand times as costly to touch.)"""
    measured = {k: types[k]["measured"] / types[k]["predicted"] for k in kinds
                if k in types and types[k]["measured"] > 0}
    if not measured:
        return {k: 1.0 for k in kinds}
    g = math.exp(sum(math.log(v) for v in measured.values()) / len(measured))
    return {k: measured.get(k, g) / g for k in kinds}


def _rescaled(spectra: dict, matrices, scale: dict) -> dict:
    kind = {m.name: m.kind for m in matrices}
    return {name: dataclasses.replace(sp, loss=sp.loss * scale[kind[name]]) for name, sp in spectra.items()}
