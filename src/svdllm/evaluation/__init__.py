"""Evaluation: perplexity by the protocol, and generation."""
from .generation import generate
from .perplexity import perplexity

__all__ = ["generate", "perplexity"]
