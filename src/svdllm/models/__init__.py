"""Models: the supported architectures, and dense models loaded from a hub id, a local directory, a GGUF file or a
bundled built-in (`svdllm.load_model` also loads a compressed directory: loader.py)."""
from .families import FAMILIES, INPUT_GROUPS, LINEAR_NAMES, SUPPORTED_FAMILIES, Family, family_of
from .loading import BUILTIN_MODELS, parse_dtype

__all__ = ["FAMILIES", "Family", "INPUT_GROUPS", "LINEAR_NAMES", "SUPPORTED_FAMILIES", "family_of", "BUILTIN_MODELS", "parse_dtype"]
