"""What the optional parts of svdllm need, and a clear message when it is missing.

The core (compress, perplexity, load, export) needs torch, transformers, safetensors and accelerate; the rest is
installed with an extra: `pip install 'svdllm[eval]'` (zero-shot tasks through lm-eval), `[lora]` (peft),
`[quant]` (torchao), `[plots]` (matplotlib), `[hub]` (datasets), or `[all]`.
"""
from __future__ import annotations

import importlib

from ..errors import SvdllmError

# module -> (the PyPI package, the extra that installs it)
EXTRAS = {"lm_eval": ("lm-eval", "eval"), "peft": ("peft", "lora"), "torchao": ("torchao", "quant"), "compressed_tensors": ("compressed-tensors", "quant"),
          "matplotlib": ("matplotlib", "plots"), "datasets": ("datasets", "hub")}
_import = importlib.import_module  # one name to replace in a test that takes the extras away


def require(module: str, what: str):
    """Import `module` for `what` (e.g. "Zero-shot evaluation"), or say which extra installs it."""
    try:
        return _import(module)
    except ImportError as e:
        package, extra = EXTRAS[module.split(".")[0]]
        raise SvdllmError(f"{what} needs {package}, which is not installed here ({e}): pip install 'svdllm[{extra}]' "
                          "(or 'svdllm[all]').") from e


def available(module: str) -> bool:
    try:
        _import(module)
    except ImportError:
        return False
    return True
