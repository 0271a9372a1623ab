"""Save and load compressed models: safetensors weights, config, tokenizer and a JSON manifest of the ranks."""
from .checkpoint import MANIFEST_NAME, load, save

__all__ = ["MANIFEST_NAME", "load", "save"]
