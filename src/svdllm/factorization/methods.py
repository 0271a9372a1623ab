"""The factorization methods."""
from __future__ import annotations

import torch

from .base import Decomposition, Method
from .whitening import cholesky_whitening


class PlainSVD(Method):
    name = "svd"
    summary = "truncated SVD of W itself (no calibration data): minimises ‖W − W′‖_F, not the output error"

    def decompose(self, weight, gram=None):
        u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
        return Decomposition(u, s, vh)


class SVDLLM(Method):
    name = "svd-llm"
    summary = "SVD-LLM: truncation-aware whitening by the Cholesky factor S of XᵀX, SVD of W·S (minimum ‖(W−W′)X‖_F)"
    needs = ("gram",)

    def decompose(self, weight, gram):
        w = weight.to(torch.float64)
        s_chol, jitter = cholesky_whitening(gram)
        u, s, vh = torch.linalg.svd(w @ s_chol, full_matrices=False)
        # W_v = Σ^½ Vᵀ S⁻¹: solve (Vᵀ) = X·S for X instead of forming S⁻¹
        right = torch.linalg.solve_triangular(s_chol, vh, upper=False, left=False)
        return Decomposition(u, s, right, info={"whitening_jitter": jitter})
