"""Update: what happens to the factors after truncation.

Only "none" exists in this release: the factors are used as the whitened truncation produced them. The
closed-form least-squares update of W_u and SVD-LLM's sequential LoRA fine-tuning are planned (see the issues).
"""
UPDATES = {"none": "keep the truncated factors as they are"}
