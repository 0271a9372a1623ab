"""Which architectures svdllm knows, and where their compressible linear layers are.

All supported families share the LLaMA layout (``model.model.layers[i].self_attn.{q,k,v,o}_proj`` and
``.mlp.{gate,up,down}_proj``), which is what makes one calibration and one factorization code path serve them all.
Linears that read the same tensor are grouped: their input Gram matrix XᵀX is identical, so it is accumulated once.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import SvdllmError

# model_type (from config.json) -> human name
SUPPORTED_FAMILIES = {
    "llama": "LLaMA (MHA and GQA)",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma3_text": "Gemma 3 (text-only, e.g. gemma-3-270m / Gemma3ForCausalLM)",
}

# group name -> the linears (paths relative to one decoder layer) that consume the same input tensor
INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}
LINEAR_NAMES: tuple[str, ...] = tuple(n for names in INPUT_GROUPS.values() for n in names)
GROUP_OF: dict[str, str] = {n: g for g, names in INPUT_GROUPS.items() for n in names}


# Where every supported family keeps its decoder layers; the one place that names the path (`layer_prefix`).
LAYERS_PATH = "model.layers"
FINAL_NORM_PATH = "model.norm"  # the norm between the last decoder layer and the LM head


def layer_prefix(i: int) -> str:
    """The state-dict prefix of decoder layer i, e.g. "model.layers.3."."""
    return f"{LAYERS_PATH}.{i}."


def layer_index(name: str) -> int | None:
    """Which decoder layer a parameter or module name belongs to (None: not in a decoder layer)."""
    head = LAYERS_PATH + "."
    if not name.startswith(head):
        return None
    i = name[len(head):].split(".", 1)[0]
    return int(i) if i.isdigit() else None


def supported_list() -> str:
    return ", ".join(f"{k} ({v})" for k, v in SUPPORTED_FAMILIES.items())


@dataclass(frozen=True)
class Family:
    model_type: str

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(LAYERS_PATH)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(FINAL_NORM_PATH)

    def linear_name(self, i: int, linear: str) -> str:
        """The full module name of a compressible linear, e.g. "model.layers.3.self_attn.q_proj"."""
        return layer_prefix(i) + linear


def family_of(model_or_config) -> Family:
    """The family of a model (or config); an unsupported one gets an error listing what is supported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise SvdllmError(
            f"Model type {model_type!r} is not supported. Supported model types: {supported_list()}. "
            "Other architectures need their decoder-layer layout added to svdllm.models.families."
        )
    return Family(model_type)


def get_submodule(layer: nn.Module, path: str) -> nn.Module:
    return layer.get_submodule(path)


def set_submodule(layer: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    setattr(parent, name, module)


def layer_linears(layer: nn.Module) -> dict[str, nn.Module]:
    return {name: layer.get_submodule(name) for name in LINEAR_NAMES}
