"""`load_model`: any model a user names, dense (models/) or compressed by svdllm (io/), by one call."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import SvdllmError
from . import MANIFEST_NAME, load
from ..models.loading import BUILTIN_MODELS, _load_builtin, _load_gguf, _load_hf, cache_root, parse_dtype


def load_model(spec: str, dtype: str | torch.dtype = "float32", layerwise: bool = False,
               layers_path: str | None = None):
    """Return (model, tokenizer) in eval mode for a built-in name, a .gguf file, a directory or a hub id.

    A directory written by ``svdllm compress`` is loaded as the compressed model it holds. With `layerwise`,
    the decoder layers stay on the meta device and are read one at a time when compression reaches them
    (models/lazy.py): a built-in name or a local directory of safetensors shards.
    """
    dtype = parse_dtype(dtype)
    path = Path(spec).expanduser()
    if layerwise:
        from ..models.lazy import load_lazy

        if spec in BUILTIN_MODELS:
            target = cache_root() / "models" / spec
            if not (target / "config.json").exists():
                _load_builtin(spec, dtype)  # converted from GGUF once (a full load); later runs read shards
            path = target
        if not path.is_dir() or (path / MANIFEST_NAME).exists():
            raise SvdllmError(f"--layerwise reads a dense model's safetensors shards: give a built-in name or a local "
                              f"model directory, not {spec!r}.")
        return load_lazy(path, dtype, display=spec if spec in BUILTIN_MODELS else None, layers_path=layers_path)
    if spec in BUILTIN_MODELS:
        model, tokenizer = _load_builtin(spec, dtype)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise SvdllmError(f"GGUF file not found: {path}")
        model, tokenizer = _load_gguf(path, dtype)
    elif path.is_dir():
        if (path / MANIFEST_NAME).exists():
            return load(path, dtype=dtype, with_tokenizer=True)
        model, tokenizer = _load_hf(str(path), dtype)
    elif spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise SvdllmError(
            f"Model path {spec!r} does not exist. Give a local model directory, a .gguf file, a hub id "
            f"such as HuggingFaceTB/SmolLM2-135M-Instruct, or a built-in name ({', '.join(BUILTIN_MODELS)})."
        )
    else:
        model, tokenizer = _load_hf(spec, dtype)
    model.eval()
    return model, tokenizer
