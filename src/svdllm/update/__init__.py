"""Update: what happens to the factors after truncation.

- "none": the factors as the (whitened) truncation produced them.
- "closed-form": SVD-LLM's update step. Keep W_v and recompute W_u by least squares so that W_u·(W_v·X′) best
  matches W·X′, where X′ are the inputs the linear receives in the compressed model (every layer before it, and
  the groups of its own layer before it, already compressed): the truncation is repaired on the inputs it will
  really see.
- "closed-form-drift": the same, but the attention's linears are fitted to the dense model's outputs W·X (X: the
  dense model's inputs), so they also undo the drift of the layers before. Not the MLP's: fitting gate/up/down to
  dense outputs from drifted inputs shrinks them toward the mean (least squares with noisy inputs) and was worse
  than no update at all (SmolLM2, R = 0.4, 8 × 512 calibration tokens: no update 290, closed-form 195,
  attention fitted to dense outputs 156, everything fitted to dense outputs 338).
- "lora" / "closed-form+lora": SVD-LLM's sequential LoRA fine-tuning of the factors (paper §3.2, update/lora.py),
  after the truncation or after the closed-form update.
"""
from __future__ import annotations

from .closed_form import closed_form_w_u, output_error

UPDATES = {
    "none": "keep the truncated factors as they are",
    "closed-form": "least-squares W_u so that W_u·W_v·X′ best matches W·X′ on the inputs X′ of the compressed model "
                   "(SVD-LLM); one calibration pass per ratio",
    "closed-form-drift": "closed-form, with the attention's linears fitted to the dense model's outputs W·X (undoes "
                         "earlier layers' drift)",
    "lora": "sequential LoRA fine-tuning of W_u, then W_v, merged back (SVD-LLM §3.2; see `svdllm finetune`)",
    "closed-form+lora": "the closed-form update, then the sequential LoRA fine-tuning",
}
# per closed-form update: the input groups whose linears are fitted to the dense model's outputs
DRIFT_GROUPS = {"closed-form": (), "closed-form-drift": ("attn_in", "attn_out")}
LORA_SUFFIX = "lora"


def base_update(update: str) -> str:
    """The update applied during compression, before any fine-tuning."""
    return update.removesuffix("+lora") if update.endswith("+lora") else "none" if update == "lora" else update


__all__ = ["DRIFT_GROUPS", "LORA_SUFFIX", "UPDATES", "base_update", "closed_form_w_u", "output_error"]
