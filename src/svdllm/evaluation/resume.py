"""What lets a long evaluation resume: a fingerprint of the weights, so that a result computed on one model is
never read back for another, and a small log of finished perplexity batches, written atomically after each one."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..utils.atomic import atomic_write_text


def weights_fingerprint(model, tokenizer) -> str:
    """A digest of every weight's bytes (and the tokenizer): equal only for models that score alike. (The
    statistics cache's `model_fingerprint` reads two layers only: enough to tell base models apart, not a
    compressed model from another compressed differently.)"""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}".encode())
    for name, t in model.state_dict().items():
        for part, plain in _plain_tensors(name, t.detach()):
            plain = plain.cpu().contiguous()
            h.update(f"{part}:{plain.dtype}:{tuple(plain.shape)}".encode())
            if plain.numel():
                h.update(plain.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _plain_tensors(name: str, t: torch.Tensor):
    """(name, tensor) of the plain tensors that make up `t`: a quantized weight (a torchao tensor subclass) is its
    codes, scales and zero points, which is what its bytes are."""
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        yield name, t
        return
    inner, _ = t.__tensor_flatten__()
    for attr in inner:
        yield from _plain_tensors(f"{name}.{attr}", getattr(t, attr))


class BatchLog:
    """The NLL sums of the batches of one perplexity run already scored, in order. The key pins everything the
    sums depend on (weights, token windows, batch size), so a resumed run adds the same numbers in the same order
    and reproduces the uninterrupted result exactly."""

    def __init__(self, root: str | os.PathLike, key: dict):
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.path = Path(root) / f"{digest}.json"
        self.done: list[float] = []
        if self.path.exists():
            record = json.loads(self.path.read_text())
            if record.get("key") == key:
                self.done = [float(x) for x in record["nll"]]

    def add(self, nll: float) -> None:
        self.done.append(nll)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"key": self.key, "nll": self.done}))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
