"""Which decoders svdllm knows, as data: one entry per family says where the decoder layers are, which linears of a
layer to compress, which of them read the same tensor, and what turns the last layer's output into logits.

Linears that read the same tensor form an input group: their input Gram matrix XᵀX is identical, so it is
accumulated once. Groups are listed in the order a layer's forward reaches them (the closed-form update compresses
them in that order), and the four roles `attn_in`, `attn_out`, `mlp_in`, `mlp_out` let the update reuse the
attention core once q/k/v are final. What one layer's forward needs besides its hidden states (masks, positions,
rotary tables) is not declared: it is recorded from the model's own forward (`capture_layer_inputs`).

A model whose type is not listed is compressed by patterns (`--targets`, `--ignore`, `--layers-path`): the layer
list is found (or given), the linears matched, and the groups found by which linears receive the same tensor in
one forward (`from_patterns`).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import nn

from ..errors import SvdllmError

log = logging.getLogger(__name__)

LLAMA_GROUPS: dict[str, tuple[str, ...]] = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}


@dataclass(frozen=True, eq=False)
class Family:
    name: str
    groups: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LLAMA_GROUPS))
    layers: str = "model.layers"  # the ModuleList of decoder layers
    head: tuple[str, ...] = ("model.norm",)  # applied in order between the last layer and the LM head (absent: skip)
    notes: str = ""
    custom: bool = False  # made from patterns or restricted by them: the statistics cache keys on the groups
    skipped: dict[str, str] = field(default_factory=dict)  # linear (within a layer) -> why it stays dense
    experts: bool = False  # mixture-of-experts blocks unfused into a linear pair per expert (models/experts.py)

    @cached_property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for names in self.groups.values() for n in names)

    @cached_property
    def group_of(self) -> dict[str, str]:
        return {n: g for g, names in self.groups.items() for n in names}

    def layer_prefix(self, i: int) -> str:
        """The state-dict prefix of decoder layer i, e.g. "model.layers.3."."""
        return f"{self.layers}.{i}."

    def layer_index(self, name: str) -> int | None:
        """Which decoder layer a parameter or module name belongs to (None: not in a decoder layer)."""
        head = self.layers + "."
        if not name.startswith(head):
            return None
        i = name[len(head):].split(".", 1)[0]
        return int(i) if i.isdigit() else None

    def linear_name(self, i: int, linear: str) -> str:
        """The full module name of a compressible linear, e.g. "model.layers.3.self_attn.q_proj"."""
        return self.layer_prefix(i) + linear

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        out = []
        for path in self.head:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            if module is not None:
                out.append(module)
        return out

    def layer_linears(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {name: layer.get_submodule(name) for name in self.linear_names}

    def record(self) -> dict:
        """What the manifest keeps: enough to find the layers of a saved model whose type is not listed."""
        return {"name": self.name, "layers": self.layers, "head": list(self.head),
                "groups": {g: list(n) for g, n in self.groups.items()}, "skipped": dict(self.skipped),
                **({"experts": "unfused"} if self.experts else {})}

    def restricted(self, targets: list[str] | None, ignore: list[str] | None) -> Family:
        """This family with only the linears that match a `targets` pattern and no `ignore` pattern (regular
        expressions searched in the linear's full name, e.g. "model.layers.3.mlp.down_proj" or "mlp")."""
        if not targets and not ignore:
            return self
        why = {n: _excluded(f"{self.layers}.0.{n}", targets, ignore) for n in self.linear_names}
        keep = {g: tuple(n for n in names if why[n] is None) for g, names in self.groups.items()}
        keep = {g: names for g, names in keep.items() if names}
        if not keep:
            raise SvdllmError(f"--targets/--ignore leave no linear of {self.name} to compress (its linears: "
                              f"{', '.join(self.linear_names)}).")
        return replace(self, groups=keep, custom=True, skipped={n: w for n, w in why.items() if w is not None})


def _excluded(full: str, targets, ignore) -> str | None:
    """Why the linear named `full` is left dense by the patterns (None: it is compressed)."""
    if targets and not any(re.search(p, full) for p in targets):
        return "matches no --targets"
    if ignore and any(re.search(p, full) for p in ignore):
        return "matches --ignore"
    return None


OPT = Family(
    "OPT", layers="model.decoder.layers", head=("model.decoder.final_layer_norm", "model.decoder.project_out"),
    groups={"attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "attn_out": ("self_attn.out_proj",), "mlp_in": ("fc1",), "mlp_out": ("fc2",)},
    notes="biases kept with W_u; learned positions added before layer 0")
PHI3 = Family(
    "Phi-3", groups={"attn_in": ("self_attn.qkv_proj",), "attn_out": ("self_attn.o_proj",),
                     "mlp_in": ("mlp.gate_up_proj",), "mlp_out": ("mlp.down_proj",)},
    notes="fused qkv_proj and gate_up_proj compressed as one matrix each")
GPT_NEOX = Family(
    "GPT-NeoX", layers="gpt_neox.layers", head=("gpt_neox.final_layer_norm",),
    groups={"attn_in": ("attention.query_key_value",), "attn_out": ("attention.dense",),
            "mlp_in": ("mlp.dense_h_to_4h",), "mlp_out": ("mlp.dense_4h_to_h",)},
    notes="fused query_key_value compressed as one matrix; parallel residual")

# model_type (config.json) -> family
FAMILIES: dict[str, Family] = {
    "llama": Family("LLaMA (MHA and GQA)"),
    "mistral": Family("Mistral"),
    "qwen2": Family("Qwen2"),
    "qwen3": Family("Qwen3"),
    "gemma2": Family("Gemma 2"),
    "gemma3_text": Family("Gemma 3 (text-only, e.g. gemma-3-270m / Gemma3ForCausalLM)"),
    "phi3": PHI3,
    "opt": OPT,
    "gpt_neox": GPT_NEOX,
}
SUPPORTED_FAMILIES = {k: f.name for k, f in FAMILIES.items()}
# The LLaMA layout's linears, for code and tests that build LLaMA-layout models
LINEAR_NAMES: tuple[str, ...] = FAMILIES["llama"].linear_names
INPUT_GROUPS = LLAMA_GROUPS
GROUP_OF: dict[str, str] = FAMILIES["llama"].group_of


def supported_list() -> str:
    return ", ".join(f"{k} ({v})" for k, v in SUPPORTED_FAMILIES.items())


def family_of(model_or_config) -> Family:
    """The family of a model (the one `use_family` gave it, else its model type's); an unknown type gets an error
    naming what is listed and how to compress it anyway."""
    given = getattr(model_or_config, "_svdllm_family", None)
    if given is not None:
        return given
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise SvdllmError(
            f"Model type {model_type!r} is not listed (listed: {supported_list()}), and this model was not "
            "compressed by patterns: `svdllm compress` (svdllm.compress) finds an unlisted model's layers and linears "
            "itself, steered by --targets/--ignore/--layers-path; or add its entry to svdllm.models.families.FAMILIES."
        )
    return FAMILIES[model_type]


def use_family(model: nn.Module, family: Family) -> Family:
    """Attach `family` to `model`: every phase then reads the model's layout from it."""
    model._svdllm_family = family
    return family


def known(config) -> bool:
    return getattr(config, "model_type", None) in FAMILIES


def resolve_family(model: nn.Module, targets=None, ignore=None, layers_path: str | None = None) -> Family:
    """The family a run compresses with: the listed one, restricted by `targets`/`ignore`, or for a model type that
    is not listed (or a `layers_path` given), one made from the patterns. Attached to the model."""
    from .experts import ExpertLinears, is_fused_experts, unfuse_experts
    from .lazy import is_lazy

    if layers_path is None and known(model.config):
        family = FAMILIES[model.config.model_type].restricted(targets, ignore)
    else:
        experts = any(is_fused_experts(m) for m in model.modules())
        if experts and is_lazy(model):
            raise SvdllmError("--layerwise does not yet read mixture-of-experts checkpoints (their experts are unfused "
                              "into one linear pair each first); load the model whole, without --layerwise.")
        if experts:
            log.info("Unfused the experts of %d mixture-of-experts blocks into a linear pair each",
                     unfuse_experts(model))
        unfused = experts or any(isinstance(m, ExpertLinears) for m in model.modules())  # (a second run)
        family = replace(from_patterns(model, targets, ignore, layers_path), experts=unfused)
        log.info("%s: decoder layers at %s; input groups %s", family.name, family.layers,
                 "; ".join(", ".join(names) for names in family.groups.values()))
    if family.skipped:
        log.info("Left dense in every layer: %s", "; ".join(f"{n} ({w})" for n, w in family.skipped.items()))
    return use_family(model, family)


def from_record(record: dict) -> Family:
    return Family(record["name"], {g: tuple(n) for g, n in record["groups"].items()}, record["layers"],
                  tuple(record["head"]), custom=True, skipped=dict(record.get("skipped", {})),
                  experts=record.get("experts") == "unfused")


def find_layers(model: nn.Module) -> str:
    """The outermost ModuleList whose entries are all of one class (the longest of those at that depth): the decoder
    layers of every transformers LM, not the experts list inside each of them."""
    lists = [(name.count("."), -len(module), name) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1]
    best = min(lists)[2] if lists else None
    if best is None:
        raise SvdllmError("Could not find the decoder layers (a ModuleList of identical blocks) in this model; "
                          "name them with --layers-path, e.g. --layers-path transformer.h.")
    return best


@torch.no_grad()
def from_patterns(model: nn.Module, targets=None, ignore=None, layers_path: str | None = None) -> Family:
    """A family for a model type that is not listed. Its linears: every nn.Linear of decoder layer 0 whose full name
    matches a `targets` pattern and no `ignore` pattern. Its groups: the linears that receive the very same tensor
    in one forward of a few tokens, in the order the forward reaches them."""
    layers = layers_path or find_layers(model)
    try:
        blocks = model.get_submodule(layers)
    except AttributeError:
        raise SvdllmError(f"--layers-path {layers!r}: the model has no such module.") from None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise SvdllmError(f"--layers-path {layers!r} is a {type(blocks).__name__}, not a list of decoder layers.")
    first = blocks[0]
    why = {n: _excluded(f"{layers}.0.{n}", targets, ignore) for n, m in first.named_modules()
           if isinstance(m, nn.Linear)}
    for n in why:  # (a router's or a gate's m = 1 row: any rank ≥ 1 costs more than the matrix)
        lin = first.get_submodule(n)
        if why[n] is None and lin.in_features * lin.out_features <= lin.in_features + lin.out_features:
            why[n] = "too small to factor"
    linears = [n for n, w in why.items() if w is None]
    if not why:
        kinds = sorted({type(m).__name__ for m in first.modules() if getattr(m, "weight", None) is not None})
        raise SvdllmError(f"{layers}.0 holds no nn.Linear (its weighted modules: {', '.join(kinds)}): svdllm "
                          f"compresses nn.Linear layers, so {model.config.model_type!r} is not supported. Listed model "
                          f"types: {supported_list()}.")
    if not linears:
        raise SvdllmError(f"No nn.Linear in {layers}.0 matches --targets {targets} (and not --ignore {ignore}); its "
                          f"linears: {', '.join(why)}.")
    import contextlib

    from .lazy import is_lazy, materialize, pass_through, release

    lazy = is_lazy(model)  # layer-wise: layer 0 read for this forward, the others pass their input through
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [first.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: seen.append((n, args[0])))
               for n in linears]
    try:
        if lazy:
            materialize(model, f"{layers}.0.")
        with pass_through(blocks[1:]) if lazy else contextlib.nullcontext():
            # enough tokens that a router sends some to every expert, as a rule (those it does not: own groups)
            ids = (torch.arange(64, device=first_device(model)) * 7919 % model.config.vocab_size).unsqueeze(0)
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        if lazy:
            release(model, f"{layers}.0.")
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for n, x in seen:
        # the same tensor object, not equal values: two experts can be sent the same tokens by chance
        match = next((g for g in groups if g[0] is x), None)
        if match is None:
            groups.append((x, [n]))
        elif n not in match[1]:
            match[1].append(n)
    missing = [n for n in linears if not any(n in g[1] for g in groups)]
    if missing:  # each reads its own input, as far as anyone can tell (an expert no token was routed to)
        log.warning("%d linears of %s.0 did not run in a forward of 64 tokens (%s); each is its own input group.",
                    len(missing), layers, ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else ""))
        groups += [(None, [n]) for n in missing]
    head = _head_guess(model, layers)
    return Family(f"{model.config.model_type} (by patterns)", {f"group{k}": tuple(g[1]) for k, g in enumerate(groups)},
                  layers, head, custom=True, skipped={n: w for n, w in why.items() if w is not None})


def first_device(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters() if not p.is_meta)


def _head_guess(model: nn.Module, layers: str) -> tuple[str, ...]:
    """The norm after the layers: the last module registered beside the layer list whose class names a norm."""
    parent = layers.rpartition(".")[0]
    base = model.get_submodule(parent) if parent else model
    norms = [n for n, m in base.named_children() if "norm" in type(m).__name__.lower() or "ln_f" in n]
    return tuple(f"{parent}.{n}" if parent else n for n in norms[-1:])


def set_submodule(layer: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    setattr(parent, name, module)
