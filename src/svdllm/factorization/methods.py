"""The factorization methods. Each one picks a right transform S and takes the SVD of W·S; the factors are
W_u = U_r Σ_r^½ and W_v = Σ_r^½ V_rᵀ S⁻¹. They differ only in S, i.e. in which error the truncation minimises."""
from __future__ import annotations

import torch

from .base import Decomposition, Method
from .whitening import cholesky_whitening, eigen_whitening


def _decompose_with_right_transform(w: torch.Tensor, s_mat: torch.Tensor | None, s_inv_apply, info=None):
    ws = w if s_mat is None else w @ s_mat
    u, s, vh = torch.linalg.svd(ws, full_matrices=False)
    return Decomposition(u, s, vh if s_inv_apply is None else s_inv_apply(vh), info=info or {})


def _cholesky_whitened(w: torch.Tensor, gram: torch.Tensor) -> Decomposition:
    """SVD of W·S with S·Sᵀ = gram (Cholesky); Vᵀ S⁻¹ by a triangular solve rather than forming S⁻¹."""
    s_chol, jitter = cholesky_whitening(gram)
    inv = lambda vh: torch.linalg.solve_triangular(s_chol, vh, upper=False, left=False)  # noqa: E731
    return _decompose_with_right_transform(w, s_chol, inv, {"whitening_jitter": jitter})


class PlainSVD(Method):
    name = "svd"
    summary = "truncated SVD of W itself (no calibration data): minimises ‖W − W′‖_F, not the output error"

    def decompose(self, weight, stats=None):
        return _decompose_with_right_transform(weight, None, None)


class SVDLLM(Method):
    name = "svd-llm"
    summary = "SVD-LLM: whitening by the Cholesky factor S of XᵀX, SVD of W·S (minimum ‖(W−W′)X‖_F)"
    needs = ("inputs",)

    def decompose(self, weight, stats):
        return _cholesky_whitened(weight, stats.gram)


class SVDLLMV2(Method):
    name = "svd-llm-v2"
    summary = ("SVD-LLM V2 loss-optimised truncation: two rounds of SVD (XᵀX = QΛQᵀ, S = QΛ^½, then SVD of W·S); "
               "no Cholesky, so a singular XᵀX never fails")
    needs = ("inputs",)

    def decompose(self, weight, stats):
        s_mat, s_pinv = eigen_whitening(stats.gram)
        return _decompose_with_right_transform(weight, s_mat, lambda vh: vh @ s_pinv,
                                               {"null_directions": int((s_pinv.abs().sum(1) == 0).sum())})


class ASVD(Method):
    name = "asvd"
    summary = "ASVD: S = diag(mean|x|^α) per input channel (α = 0.5), SVD of W·S"
    needs = ("inputs",)

    def __init__(self, alpha: float = 0.5):
        self.alpha = alpha

    @classmethod
    def options(cls):
        return {"alpha": "exponent of the activation scale mean|x|^α (default 0.5; 0 gives plain SVD)"}

    def decompose(self, weight, stats):
        # channels that never fire would give a zero scale; floor them so S stays invertible
        scale = stats.abs_mean.to(torch.float64).clamp_min(1e-6 * float(stats.abs_mean.max().clamp_min(1e-30)))
        scale = scale.pow(self.alpha)
        return _decompose_with_right_transform(weight, torch.diag(scale), lambda vh: vh / scale)


class DipSVD(Method):
    name = "dipsvd"
    summary = ("DipSVD channel protection: the top p% input channels by α_j = ‖(XᵀX)_j‖ are boosted ×a in the "
               "whitening statistics (p = 5%, a = 2), then SVD-LLM whitening")
    needs = ("inputs",)

    def __init__(self, top_fraction: float = 0.05, boost: float = 2.0):
        if not 0 < top_fraction <= 1 or boost <= 0:
            raise ValueError(f"top_fraction must be in (0, 1] and boost positive, got {top_fraction}, {boost}")
        self.top_fraction, self.boost = top_fraction, boost

    @classmethod
    def options(cls):
        return {"top_fraction": "fraction p of input channels protected (default 0.05)",
                "boost": "factor a > 1 on the protected channels' statistics (default 2)"}

    def protection(self, gram: torch.Tensor) -> torch.Tensor:
        """D = diag(a on the top-p% channels by α_j = ‖row j of XᵀX‖, 1 elsewhere)."""
        alpha = gram.to(torch.float64).norm(dim=1)
        k = max(1, round(self.top_fraction * alpha.numel()))
        d = torch.ones_like(alpha)
        d[alpha.topk(k).indices] = self.boost
        return d

    def decompose(self, weight, stats):
        d = self.protection(stats.gram)
        # X̃ = D·X (channels scaled), so X̃ᵀX̃ = D·XᵀX·D
        return _cholesky_whitened(weight, d[:, None] * stats.gram.to(torch.float64) * d[None, :])


def shrink(gram: torch.Tensor, intensity: float) -> torch.Tensor:
    """(1 − γ)·M + γ·mean(diag M)·I: pulls a second moment estimated from few tokens toward a scaled identity."""
    g = gram.to(torch.float64)
    if intensity == 0:
        return g
    out = (1 - intensity) * g
    out.diagonal().add_(intensity * g.diagonal().mean())  # in place: no n × n identity (1.6 GB at n = 14,336)
    return out


class KFACSVD(Method):
    name = "kfac-svd"
    summary = ("two-sided Fisher whitening (KFAC-SVD): SVD of L_gᵀ·W·L_x with L_x L_xᵀ = XᵀX and L_g L_gᵀ = GᵀG, "
               "G the LM-loss gradient at the layer's output; minimises the KFAC estimate of the loss increase")
    needs = ("inputs", "output_grams")

    def __init__(self, shrink_inputs: float = 0.0, shrink_outputs: float = 0.1):
        for v in (shrink_inputs, shrink_outputs):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"shrinkage intensities are in [0, 1], got {v}")
        self.shrink_inputs, self.shrink_outputs = shrink_inputs, shrink_outputs

    @classmethod
    def options(cls):
        return {"shrink_inputs": "shrinkage γ of XᵀX toward mean(diag)·I (default 0)",
                "shrink_outputs": "shrinkage γ of GᵀG toward mean(diag)·I (default 0.1: G comes from few windows)"}

    def decompose(self, weight, stats):
        if stats.output_gram is None:
            raise ValueError("kfac-svd needs the output-gradient second moment (gathered by the gradient pass)")
        l_x, jitter_x = cholesky_whitening(shrink(stats.gram, self.shrink_inputs))
        l_g, jitter_g = cholesky_whitening(shrink(stats.output_gram, self.shrink_outputs))
        # ‖L_gᵀ(W − W′)L_x‖_F² = tr(G·ΔW·XᵀX·ΔWᵀ): truncating the SVD of L_gᵀ·W·L_x minimises it
        u, s, vh = torch.linalg.svd(l_g.T @ weight @ l_x, full_matrices=False)
        left = torch.linalg.solve_triangular(l_g.T, u, upper=True)  # L_g⁻ᵀ U
        right = torch.linalg.solve_triangular(l_x, vh, upper=False, left=False)  # Vᵀ L_x⁻¹
        return Decomposition(left, s, right, info={"whitening_jitter": jitter_x, "output_jitter": jitter_g,
                                                   "kfac_loss": True})


class FWSVD(Method):
    name = "fwsvd"
    summary = ("FWSVD (Hsu et al. 2022): rows weighted by √(Σ_j Fisher) from squared gradients of the LM loss, "
               "SVD of D·W, un-weighted after")
    needs = ("fisher",)

    def decompose(self, weight, stats):
        rows = stats.fisher_rows.to(torch.float64)
        # rows whose gradient was exactly zero would make D singular; floor them at a tiny fraction of the mean
        d = rows.clamp_min(1e-12 * float(rows.mean().clamp_min(1e-300))).sqrt()
        u, s, vh = torch.linalg.svd(d[:, None] * weight, full_matrices=False)
        return Decomposition(u / d[:, None], s, vh)
