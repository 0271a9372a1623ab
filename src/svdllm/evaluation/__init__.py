"""Evaluation: perplexity by the protocol, zero-shot accuracy with lm-eval on local data, and generation."""
from .generation import generate
from .perplexity import perplexity
from .zeroshot import PAPER_TASKS, zero_shot

__all__ = ["PAPER_TASKS", "generate", "perplexity", "zero_shot"]
