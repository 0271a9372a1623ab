"""Models: loading (hub id, local directory, GGUF file, bundled built-ins) and the supported architectures."""
from .families import INPUT_GROUPS, LINEAR_NAMES, SUPPORTED_FAMILIES, family_of
from .loading import BUILTIN_MODELS, load_model, parse_dtype

__all__ = ["INPUT_GROUPS", "LINEAR_NAMES", "SUPPORTED_FAMILIES", "family_of", "BUILTIN_MODELS", "load_model", "parse_dtype"]
