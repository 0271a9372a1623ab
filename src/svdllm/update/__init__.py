"""Update: what happens to the factors after truncation.

- "none": the factors as the (whitened) truncation produced them.
- "closed-form": SVD-LLM's whitening + update step. Keep W_v and recompute W_u by least squares so that
  W_u·(W_v·X′) best matches W·X, where X are the dense model's inputs of the layer and X′ the inputs it sees once
  the layers before it are compressed: the truncation error and the drift from earlier layers are both absorbed.
- "lora" / "closed-form+lora": SVD-LLM's sequential LoRA fine-tuning of the factors (paper §3.2, update/lora.py),
  after the truncation or after the closed-form update.
"""
from __future__ import annotations

import torch

UPDATES = {
    "none": "keep the truncated factors as they are",
    "closed-form": "least-squares W_u so that W_u·W_v·X′ best matches W·X (X′: inputs after earlier layers are "
                   "compressed); one calibration pass per ratio",
    "lora": "sequential LoRA fine-tuning of W_u, then W_v, merged back (SVD-LLM §3.2; see `svdllm finetune`)",
    "closed-form+lora": "the closed-form update, then the sequential LoRA fine-tuning",
}
LORA_SUFFIX = "lora"


def base_update(update: str) -> str:
    """The update applied during compression, before any fine-tuning."""
    return update.removesuffix("+lora") if update.endswith("+lora") else "none" if update == "lora" else update


def closed_form_w_u(weight: torch.Tensor, w_v: torch.Tensor, cross: torch.Tensor, gram_compressed: torch.Tensor,
                    ) -> torch.Tensor:
    """argmin over W_u of ‖W·X − W_u·W_v·X′‖_F (columns = tokens), from the moments XᵀX′ and X′ᵀX′ (rows = tokens).

    Normal equations: W_u·(W_v X′ᵀX′ W_vᵀ) = W·(XᵀX′)·W_vᵀ. The r × r system is solved by Cholesky, with a ridge
    of 10⁻¹⁰·mean(diag) (×10 per retry) if W_v·X′ is rank-deficient on the calibration data.
    """
    w, v = weight.to(torch.float64), w_v.to(torch.float64)
    a = v @ gram_compressed.to(torch.float64) @ v.T
    a = (a + a.T) / 2
    b = w @ cross.to(torch.float64) @ v.T
    scale = float(a.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    for k in range(-1, 10):
        chol, info = torch.linalg.cholesky_ex(a if k < 0 else a + scale * 1e-10 * 10**k * eye)
        if int(info) == 0:
            return torch.cholesky_solve(b.T, chol).T
    raise ValueError("the closed-form update's normal equations could not be solved")
