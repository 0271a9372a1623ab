"""Models bigger than memory: the decoder layers stay on the meta device and are read from their safetensors
shards one at a time (`svdllm compress --layerwise`), like llm-compressor's sequential onloading.

The embeddings, final norm and LM head are loaded at once; a decoder layer is materialized just before the
calibration pass reaches it and released (back to meta) once its factors are written, so peak memory is about one
layer plus its activations and statistics, whatever the depth. accelerate's `set_module_tensor_to_device` moves
the tensors; safetensors reads only the requested ones.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import SvdllmError
from .families import FAMILIES, family_of, find_layers


class LazyCheckpoint:
    """Which shard holds each tensor, read from the safetensors headers only."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.dir = Path(directory)
        self.files: dict[str, Path] = {}
        shards = sorted(self.dir.glob("*.safetensors"))
        if not shards:
            raise SvdllmError(f"No .safetensors weights in {self.dir}: layer-wise loading reads safetensors shards.")
        for f in shards:
            with safe_open(f, "pt") as handle:
                for name in handle.keys():
                    self.files[name] = f

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise SvdllmError(f"The checkpoint in {self.dir} has no tensor {name}.")
        with safe_open(self.files[name], "pt") as handle:
            return handle.get_tensor(name)


def is_lazy(model: nn.Module) -> bool:
    return getattr(model, "_svdllm_lazy", None) is not None


def _set(model: nn.Module, name: str, value: torch.Tensor | None, device="cpu") -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, name, device if value is not None else "meta", value=value)


def materialize(model: nn.Module, prefix: str) -> None:
    """Read every meta parameter under `prefix` from the checkpoint, in the model's dtype, onto its device."""
    ckpt: LazyCheckpoint = model._svdllm_lazy
    dtype = model._svdllm_dtype
    for name, p in list(model.named_parameters()):
        if name.startswith(prefix) and p.is_meta:
            _set(model, name, ckpt.get(name).to(dtype), device=model._svdllm_device)


def to_device(model: nn.Module, device: str | torch.device) -> None:
    """Move what is loaded to `device`; the layers read later go there too (one at a time on a GPU)."""
    model._svdllm_device = torch.device(device)
    for name, p in list(model.named_parameters()):
        if not p.is_meta:
            _set(model, name, p.data, device=device)
    for module in model.modules():
        for key, b in list(module._buffers.items()):
            if b is not None and not b.is_meta:
                module._buffers[key] = b.to(device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def release(model: nn.Module, prefix: str) -> None:
    """Drop every parameter under `prefix` back to the meta device."""
    for name, p in list(model.named_parameters()):
        if name.startswith(prefix) and not p.is_meta:
            _set(model, name, None)


@contextlib.contextmanager
def resident(model: nn.Module, i: int):
    """Decoder layer i materialized for the duration (a no-op for an ordinary model)."""
    if not is_lazy(model):
        yield
        return
    prefix = family_of(model).layer_prefix(i)
    was_meta = any(p.is_meta for n, p in model.named_parameters() if n.startswith(prefix))
    materialize(model, prefix)
    try:
        yield
    finally:
        if was_meta:
            release(model, prefix)


@contextlib.contextmanager
def pass_through(layers):
    """Decoder layers that return their input: the model's own loop then builds every layer's keyword arguments
    (masks, rotary tables per layer type) without touching a weight."""
    for layer in layers:
        layer.forward = lambda hidden_states=None, *args, **kwargs: hidden_states
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def resident_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)


def load_lazy(directory: str | os.PathLike, dtype: torch.dtype, display: str | None = None,
              layers_path: str | None = None):
    """(model, tokenizer) with everything but the decoder layers loaded; the layers come on demand. The layers are
    where the model type's family has them, else at `layers_path` or the longest list of identical blocks."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    try:
        config = AutoConfig.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # transformers raises many types for a bad directory
        raise SvdllmError(f"Could not read a model config and tokenizer from {directory}: {e}") from e
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    known = FAMILIES.get(config.model_type)
    layers = layers_path or (known.layers if known else find_layers(model))
    model._svdllm_lazy = LazyCheckpoint(directory)
    model._svdllm_dtype = dtype
    model._svdllm_device = torch.device("cpu")
    tied = getattr(config, "tie_word_embeddings", False)
    for name, p in list(model.named_parameters()):
        if not name.startswith(layers + ".") and not (tied and name == "lm_head.weight"):
            _set(model, name, model._svdllm_lazy.get(name).to(dtype))
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.config.name_or_path = display or str(directory)  # as a whole load names it (the cache key reads it)
    model.eval()
    return model, tokenizer
