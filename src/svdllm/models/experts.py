"""Mixture-of-experts blocks whose experts transformers 5 keeps as two 3-D tensors (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE: `gate_up_proj` E × 2I × H and `down_proj` E × H × I) unfused into one nn.Linear pair per expert. Each
expert's matrices are then ordinary linears: calibrated on the tokens the router sends to that expert only (a
forward hook on an expert fires for its tokens alone), given their own ranks, saved and loaded like any other.

This file is also copied into the modeling file of a saved model (io/hf_native.py), which needs torch alone: it
imports nothing else.
"""
import torch
from torch import nn


def is_fused_experts(module: nn.Module) -> bool:
    """The SwiGLU experts layout this file reproduces exactly: gate rows before up rows, no biases, no clamping."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3 and isinstance(down, nn.Parameter)
            and down.dim() == 3 and hasattr(module, "act_fn") and not getattr(module, "is_transposed", False)
            and not any(n.endswith("_bias") for n, _ in module.named_parameters()) and not hasattr(module, "limit"))


class Expert(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act_fn, device=None, dtype=None):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, device=device, dtype=dtype)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class ExpertLinears(nn.ModuleList):
    """The experts of one block, called as transformers calls its fused experts module (same routing arithmetic)."""

    def __init__(self, experts: list[Expert]):
        super().__init__(experts)
        self.num_experts = len(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == self.num_experts:
                continue
            pos, tokens = torch.where(mask[e])
            out = self[e](hidden_states[tokens]) * top_k_weights[tokens, pos, None]
            final.index_add_(0, tokens, out.to(final.dtype))
        return final


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` by an ExpertLinears (weights copied; on the meta device, empty
    ones). Returns how many blocks were unfused."""
    fused = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    for name, m in fused:
        experts, hidden, two_i = m.gate_up_proj.shape[0], m.gate_up_proj.shape[2], m.gate_up_proj.shape[1]
        p = m.gate_up_proj
        new = ExpertLinears([Expert(hidden, two_i // 2, m.act_fn, device=p.device, dtype=p.dtype)
                             for _ in range(experts)])
        if not p.is_meta:
            with torch.no_grad():
                for e, expert in enumerate(new):
                    expert.gate_up_proj.weight.copy_(m.gate_up_proj[e])
                    expert.down_proj.weight.copy_(m.down_proj[e])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return len(fused)
