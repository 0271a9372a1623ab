"""The allocators: how many ranks each matrix keeps under the budget of ratio R.

uniform  the protocol's r = floor((1−R)·m·n/(m+n)) everywhere;
v2       SVD-LLM V2: within each matrix type, ratios ∝ 1/log(truncation loss at the uniform ratio);
lorap    LoRAP: attention and MLP get different ratios, the split chosen to minimise the relative whitened loss;
dipsvd   DipSVD's layer ratios: Fisher importance of the layer times its effective-rank ratio;
global   ours: every singular direction of every matrix competes for the budget by its predicted increase of the
         model's loss (KFAC: σ_k² · ṽ_kᵀ(XᵀX)ṽ_k · u_kᵀ G u_k, G the output-gradient second moment), solved exactly
         on the concave hull of each matrix's loss curve.
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field

import torch

from ..errors import SvdllmError
from .joint import JointAllocation, Widths, joint_allocation, parameter_ratio
from .budget import MatrixInfo, budget, check_feasible, exact_rank, fit_to_budget, greedy


@dataclass
class Spectrum:
    """What allocation may know about one matrix after its decomposition."""

    s: torch.Tensor  # the method's singular values, descending
    loss: torch.Tensor | None = None  # predicted model-loss increase of dropping each component (needs gradients)
    grad_norm: float | None = None  # RMS over windows of ‖∂L/∂W‖_F
    weight_norm: float | None = None  # ‖W‖_F
    # bits -> (dense, low-rank): the relative output error ‖ΔW·X‖²/‖W·X‖² that quantizing W, or its factor pair,
    # at that width leaves (GPTQ on the input Gram); for the joint rank-and-bits allocation
    quant_error: dict | None = None

    def truncation_loss(self, rank: int) -> float:
        """√(Σ_{k≥r} s_k²): for truncation-aware methods, exactly ‖(W − W′)X‖_F."""
        return float(self.s[rank:].double().pow(2).sum().sqrt())


@dataclass
class Allocation:
    """One ratio's allocation: every matrix's rank (None: dense) and, from a joint rank-and-bits allocation, its
    width (None: float) and the planned bytes of the compressed linears; `info` is what the allocator reports (the
    global allocator's measured rounds), recorded in the manifest."""

    ranks: dict[str, int | None]
    info: dict = field(default_factory=dict)
    bits: dict[str, int | None] | None = None
    linear_bytes: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Allocation:
        return cls(**{k: d.get(k) for k in ("ranks", "bits", "linear_bytes")}, info=d.get("info") or {})


class Allocator:
    name = ""
    summary = ""
    needs: tuple[str, ...] = ()  # "spectrum": the decompositions first; "gradients": the backward pass too

    def __init__(self, **options):
        unknown = set(options) - set(self.options())
        if unknown:
            raise SvdllmError(f"Allocator {self.name!r} has no option {', '.join(sorted(unknown))}; "
                              f"its options: {', '.join(self.options()) or 'none'}.")
        self.__dict__.update(options)

    @classmethod
    def options(cls) -> dict:
        return {}

    def allocate(self, matrices: list[MatrixInfo], ratio: float, spectra: dict[str, Spectrum] | None = None,
                 multiple: int = 1) -> dict[str, int | None]:
        raise NotImplementedError

    @property
    def measurement_windows(self) -> int:
        """How many calibration windows `search` measures the model's loss on (0: it never measures)."""
        return 0

    def search(self, matrices: list[MatrixInfo], ratios: list[float], spectra: dict[str, Spectrum] | None = None,
               multiple: int = 1, measure=None, widths: Widths | None = None) -> dict[float, Allocation]:
        """ratio -> Allocation for every ratio of a run. `measure(ranks) -> loss`, if given, is the model's mean loss
        on `measurement_windows` windows with the named matrices truncated at those ranks (allocation/refine.py); an
        allocator that only reads spectra ignores it. `widths`: choose each matrix's bit width with its rank, R then
        being the fraction of the compressed linears' float32 bytes removed (the global allocator only)."""
        if widths is not None:
            raise SvdllmError(f"Allocator {self.name!r} chooses ranks only; --bits needs --alloc global.")
        return {r: Allocation(self.allocate(matrices, r, spectra, multiple)) for r in ratios}

    def _spectra(self, matrices, spectra):
        if spectra is None or any(m.name not in spectra for m in matrices):
            raise SvdllmError(f"Allocator {self.name!r} needs every matrix's spectrum (pipeline bug).")
        return spectra


class Uniform(Allocator):
    name = "uniform"
    summary = "the same ratio for every matrix: r = floor((1−R)·m·n/(m+n)) (the protocol's rule)"

    def allocate(self, matrices, ratio, spectra=None, multiple=1):
        if multiple > 1:  # rounding to a multiple breaks the formula: keep its spirit, fill the budget exactly
            return fit_to_budget(matrices, {m.name: exact_rank(m, 1.0 - ratio) for m in matrices}, ratio, multiple)
        ranks: dict[str, int | None] = {}
        for m in matrices:
            r = math.floor((1.0 - ratio) * m.dense_params / (m.out_features + m.in_features))
            if r < 1:
                raise SvdllmError(f"Ratio {ratio} leaves rank {r} for {m.name} ({m.out_features}×{m.in_features}); "
                                  "use a lower --ratio.")
            ranks[m.name] = None if m.lowrank_params(r) >= m.dense_params else r
        return ranks


class V2(Allocator):
    name = "v2"
    summary = ("SVD-LLM V2: per matrix type, R_i = R·normalise(1/log L_i), L_i the theoretical truncation loss at "
               "the uniform ratio; clamped to valid ranks, budget re-balanced")
    needs = ("spectrum",)

    def ratios(self, matrices, ratio, spectra) -> dict[str, float]:
        by_kind: dict[str, list[MatrixInfo]] = {}
        for m in matrices:
            by_kind.setdefault(m.kind, []).append(m)
        out = {}
        for group in by_kind.values():
            logs = []
            for m in group:
                r_u = max(1, math.floor((1.0 - ratio) * m.dense_params / (m.out_features + m.in_features)))
                loss = spectra[m.name].truncation_loss(r_u)
                logs.append(math.log(loss) if loss > 0 else -math.inf)
            if min(logs) <= 0:
                # 1/log L is meaningless where L ≤ 1 (a scale question, not a redundancy one): shift the logs so
                # the smallest is 1, which keeps their order and differences
                finite = [v for v in logs if math.isfinite(v)]
                low = min(finite) if finite else 0.0
                logs = [(v if math.isfinite(v) else low) - low + 1.0 for v in logs]
            inv = [1.0 / v for v in logs]
            mean = sum(inv) / len(inv)
            for m, w in zip(group, inv):
                out[m.name] = ratio * w / mean
        return out

    def allocate(self, matrices, ratio, spectra=None, multiple=1):
        spectra = self._spectra(matrices, spectra)
        r = self.ratios(matrices, ratio, spectra)
        return fit_to_budget(matrices, {m.name: exact_rank(m, min(1.0, max(0.0, 1.0 - r[m.name]))) for m in matrices},
                             ratio, multiple)


def effective_rank(s: torch.Tensor, threshold: float) -> int:
    """The smallest k with Σ_{i≤k} σ_i ≥ threshold · Σ σ_i."""
    s = s.double()
    cum = s.cumsum(0) / s.sum().clamp_min(1e-300)
    return int((cum < threshold).sum()) + 1


def _effective_rank_ratio(matrices, spectra, threshold: float) -> float:
    """Parameter-weighted mean of k_eff / min(m, n) over `matrices`."""
    total = sum(m.dense_params for m in matrices)
    return sum(effective_rank(spectra[m.name].s, threshold) / spectra[m.name].s.numel() * m.dense_params
               for m in matrices) / total


class LoRAP(Allocator):
    name = "lorap"
    summary = ("LoRAP: attention and MLP at different ratios (attention has the lower effective rank); option "
               "attn_keep = kept fraction of the attention parameters, default: the two kept fractions in the ratio "
               "of the sub-layers' effective-rank ratios (threshold 0.9)")
    needs = ("spectrum",)
    attn_keep: float | None = None
    threshold: float = 0.9

    @classmethod
    def options(cls):
        return {"attn_keep": "kept fraction of the attention matrices' parameters (0..1); default: data-driven",
                "threshold": "cumulative singular-value fraction defining the effective rank (default 0.9)"}

    def split(self, matrices, ratio, spectra) -> tuple[float, float]:
        attn = [m for m in matrices if m.is_attention]
        mlp = [m for m in matrices if not m.is_attention]
        p_a, p_m = sum(m.dense_params for m in attn), sum(m.dense_params for m in mlp)
        total_keep = budget(matrices, ratio)
        if not attn or not mlp:
            return 1.0 - ratio, 1.0 - ratio

        def mlp_keep(a):
            return (total_keep - a * p_a) / p_m

        if self.attn_keep is not None:
            a = float(self.attn_keep)
            if not 0.0 < a <= 1.0 or not 0.0 < mlp_keep(a) <= 1.0:
                raise SvdllmError(f"attn_keep={a} is infeasible at ratio {ratio}: the MLP would keep "
                                  f"{mlp_keep(a):.3f} of its parameters; choose a value with both in (0, 1].")
            return a, mlp_keep(a)
        # LoRAP's observation, measured: each sub-layer keeps parameters in proportion to its effective-rank ratio
        e_a = _effective_rank_ratio(attn, spectra, self.threshold)
        e_m = _effective_rank_ratio(mlp, spectra, self.threshold)
        t = total_keep / (e_a * p_a + e_m * p_m)
        a, b = t * e_a, t * e_m
        if a > 1.0:  # attention kept whole, the rest of the budget to the MLP
            a, b = 1.0, mlp_keep(1.0)
        elif b > 1.0:
            b, a = 1.0, (total_keep - p_m) / p_a
        return a, b

    def allocate(self, matrices, ratio, spectra=None, multiple=1):
        spectra = self._spectra(matrices, spectra)
        a, b = self.split(matrices, ratio, spectra)
        return fit_to_budget(matrices, {m.name: exact_rank(m, a if m.is_attention else b) for m in matrices},
                             ratio, multiple)


class DipSVDLayers(Allocator):
    name = "dipsvd"
    summary = ("DipSVD layer ratios: layer importance S_l = Σ ‖∂L/∂W‖_F/‖W‖_F (Fisher) times the effective-rank "
               "ratio (smallest k with Σ_{i≤k}σ_i ≥ threshold·Σσ_i, threshold 0.9); kept fraction ∝ their geometric "
               "mean, uniform within a layer")
    needs = ("spectrum", "gradients")
    threshold: float = 0.9

    @classmethod
    def options(cls):
        return {"threshold": "cumulative singular-value fraction defining the effective rank (default 0.9)"}

    def layer_scores(self, matrices, spectra) -> dict[int, float]:
        importance: dict[int, float] = {}
        eff: dict[int, list[float]] = {}
        for m in matrices:
            sp = spectra[m.name]
            if sp.grad_norm is None or sp.weight_norm is None:
                raise SvdllmError("The dipsvd allocator needs gradient statistics (pipeline bug).")
            importance[m.layer] = importance.get(m.layer, 0.0) + sp.grad_norm / max(sp.weight_norm, 1e-30)
            eff.setdefault(m.layer, []).append(effective_rank(sp.s, self.threshold) / sp.s.numel())
        mean_i = sum(importance.values()) / len(importance)
        eff_l = {l: sum(v) / len(v) for l, v in eff.items()}
        mean_e = sum(eff_l.values()) / len(eff_l)
        return {l: math.sqrt(max(importance[l] / mean_i, 1e-12) * max(eff_l[l] / mean_e, 1e-12)) for l in importance}

    def allocate(self, matrices, ratio, spectra=None, multiple=1):
        spectra = self._spectra(matrices, spectra)
        score = self.layer_scores(matrices, spectra)
        total = sum(m.dense_params for m in matrices)
        mean = sum(score[m.layer] * m.dense_params for m in matrices) / total  # parameter-weighted
        keep = {m.name: min(1.0, (1.0 - ratio) * score[m.layer] / mean) for m in matrices}
        return fit_to_budget(matrices, {m.name: exact_rank(m, keep[m.name]) for m in matrices}, ratio, multiple)


class Global(Allocator):
    name = "global"
    summary = ("ours: each singular direction of each matrix priced by its predicted increase of the model's loss "
               "(σ_k²·ṽ_kᵀXᵀXṽ_k·u_kᵀGu_k, G from the loss gradients), rescaled per matrix type by one measured "
               "truncation; the budget goes to the cheapest losses first, exactly on each matrix's concave hull")
    needs = ("spectrum", "gradients", "inputs")
    min_keep: float = 0.0
    per_layer: float = 0.0
    calibrate: float = 2.0
    refine: int = 1

    @classmethod
    def options(cls):
        return {"min_keep": "every matrix keeps at least this fraction of its uniform rank (0..1, default 0): a trust "
                            "region for the quadratic loss model",
                "per_layer": "1: allocate whole layers (one ratio for a layer's matrices) by their summed predicted "
                             "loss; 0 (default): every matrix on its own",
                "calibrate": "rescale the predicted losses of each matrix type by the model's measured loss increase "
                             "when that type alone is truncated at the uniform rank, on this many calibration windows "
                             "(default 2; 0: the KFAC predictions as they are)",
                "refine": "rounds that measure those scales again at the previous allocation's own ranks and "
                          "allocate anew; each allocation's loss is measured and the lowest kept (default 1; each "
                          "round costs one decomposition of every matrix and 8 forward passes over the "
                          "`calibrate` windows per ratio)"}

    def __init__(self, **options):
        super().__init__(**options)
        for key in ("calibrate", "refine"):
            value = getattr(self, key)
            if value < 0 or value != int(value):
                raise SvdllmError(f"The global allocator's {key} must be a whole number >= 0, got {value:g}.")

    @property
    def measurement_windows(self) -> int:
        return int(self.calibrate)

    def search(self, matrices, ratios, spectra=None, multiple=1, measure=None, widths=None):
        measured = bool(self.calibrate) and measure is not None and \
            any(sp.loss is not None for sp in (spectra or {}).values())
        if widths is not None:
            return self._search_joint(matrices, ratios, spectra, multiple, measure if measured else None, widths)
        if not measured:
            return super().search(matrices, ratios, spectra, multiple)
        from .refine import refined_allocation

        ranks, info = refined_allocation(self.allocate, matrices, ratios, spectra, multiple, measure, int(self.refine))
        return {r: Allocation(ranks[r], info[r]) for r in ratios}

    def _search_joint(self, matrices, ratios, spectra, multiple, measure, widths: Widths) -> dict:
        """Ranks and widths together (allocation/joint.py), on the predicted losses rescaled per matrix type by one
        measured round: the measured rounds judge an allocation by its truncation alone, which cannot rank a joint
        choice, so the type scales are measured at the uniform ranks of the ratio of parameters the byte budget
        leaves at the middle width, and the allocation made from them is the one kept."""
        spectra = self._spectra(matrices, spectra)
        chosen: dict[float, JointAllocation] = {}

        def allocate(matrices, ratio, spectra, multiple):
            chosen[ratio] = joint_allocation(matrices, ratio, self._losses(matrices, spectra), spectra, widths, multiple)
            return chosen[ratio].ranks

        if measure is None:
            info = {r: {} for r in ratios}
            for r in ratios:
                allocate(matrices, r, spectra, multiple)
        else:
            from .refine import refined_allocation

            start = {r: Uniform().allocate(matrices, parameter_ratio(r, widths)) for r in ratios}
            _, info = refined_allocation(allocate, matrices, ratios, spectra, multiple, measure, 0, start)
        return {r: Allocation(chosen[r].ranks, info[r], bits=chosen[r].bits, linear_bytes=chosen[r].linear_bytes)
                for r in ratios}

    def _floor(self, m: MatrixInfo, ratio: float, multiple: int) -> int:
        r = math.ceil(self.min_keep * (1.0 - ratio) * m.dense_params / (m.out_features + m.in_features))
        r = -(-r // multiple) * multiple
        return max(multiple, min(r, m.dense_rank(multiple)))

    def _losses(self, matrices, spectra) -> dict[str, torch.Tensor]:
        out = {}
        for m in matrices:
            loss = spectra[m.name].loss
            if loss is None:
                raise SvdllmError("The global allocator needs gradient statistics (pipeline bug).")
            if not torch.isfinite(loss).all():
                raise SvdllmError(f"The predicted losses of {m.name} contain NaN/inf: the statistics are damaged.")
            out[m.name] = torch.cat([loss.new_zeros(1), loss.double().clamp_min(0).cumsum(0)])  # avoided by top-r
        return out

    def allocate(self, matrices, ratio, spectra=None, multiple=1):
        spectra = self._spectra(matrices, spectra)
        check_feasible(matrices, ratio, multiple)
        if not 0.0 <= self.min_keep <= 1.0:
            raise SvdllmError(f"min_keep must be in [0, 1], got {self.min_keep}.")
        target = budget(matrices, ratio)
        gains = self._losses(matrices, spectra)

        def gain(m, r):
            g = gains[m.name]
            return float(g[-1] if r is None else g[min(r, g.numel() - 1)])

        if self.per_layer:
            layers: dict[int, list[MatrixInfo]] = {}
            for m in matrices:
                layers.setdefault(m.layer, []).append(m)
            units = []
            for group in layers.values():
                pts = []
                for step in range(1, 101):  # kept fraction of the layer's matrices, 1% steps
                    keep = step / 100
                    rs = [None if keep >= 1 else max(multiple, int(exact_rank(m, keep) // multiple) * multiple)
                          for m in group]
                    rs = [None if r is not None and r > m.dense_rank(multiple) else r for m, r in zip(group, rs)]
                    pts.append((sum(m.cost(r) for m, r in zip(group, rs)), sum(gain(m, r) for m, r in zip(group, rs)),
                                keep))
                units.append(pts)
            chosen = greedy(units, target)
            keep = {m.name: units[u][chosen[u]][2] for u, group in enumerate(layers.values()) for m in group}
            return fit_to_budget(matrices, {m.name: exact_rank(m, keep[m.name]) for m in matrices}, ratio, multiple)

        units = []
        for m in matrices:
            top = m.dense_rank(multiple)
            pts = [(m.lowrank_params(r), gain(m, r), r) for r in range(self._floor(m, ratio, multiple), top + 1, multiple)]
            pts.append((m.dense_params, gain(m, None), None))
            units.append(pts)
        chosen = greedy(units, target)
        return {m.name: units[u][chosen[u]][2] for u, m in enumerate(matrices)}


ALLOCATORS: dict[str, type[Allocator]] = {a.name: a for a in (Uniform, V2, LoRAP, DipSVDLayers, Global)}


def get_allocator(name: str, **options) -> Allocator:
    if name not in ALLOCATORS:
        raise SvdllmError(f"Unknown allocator {name!r}; available: {', '.join(ALLOCATORS)} (see `svdllm allocators`).")
    return ALLOCATORS[name](**options)
