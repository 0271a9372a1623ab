"""Each matrix decomposed once per run: the spectra phase keeps every decomposition here, and the allocation's
measurements and the final factorization read their factors back instead of decomposing again.

One safetensors file per matrix on disk (float64, exactly as computed), so that memory holds one decomposition at a
time whatever the model's size. Only the components a factor pair can use are kept: a rank-r pair costs r·(m + n)
parameters, so no allocation goes beyond r = m·n / (m + n), about half of min(m, n) for a square matrix; the
whole spectrum `s` is kept, since truncation losses read its tail. That makes the store about the size of the
compressed linears in float64 (SmolLM2-135M: 0.85 GB; a Llama-3-8B: 56 GB), under the statistics' cache root.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils.atomic import atomic_path
from .base import Decomposition


class DecompositionStore:
    def __init__(self, root: str | Path | None = None):
        """A fresh scratch directory under `root` (the system's temporary directory if None); `close` removes it."""
        if root is not None:
            Path(root).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="svdllm-decompositions-", dir=root))

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.safetensors"

    def put(self, name: str, dec: Decomposition, keep: int) -> None:
        """Keep `dec` for its first `keep` components (the largest rank any factor pair of this matrix may have)."""
        keep = min(keep, dec.max_rank)
        tensors = {"left": dec.left[:, :keep], "s": dec.s, "right": dec.right[:keep]}
        with atomic_path(self._path(name)) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp,
                      metadata={"info": json.dumps(dec.info, default=float)})

    def get(self, name: str, device: torch.device | str = "cpu") -> Decomposition | None:
        path = self._path(name)
        if not path.exists():
            return None
        with safe_open(path, framework="pt", device="cpu") as f:
            info = json.loads(f.metadata()["info"])
            t = {k: f.get_tensor(k).to(device) for k in ("left", "s", "right")}
        return Decomposition(t["left"], t["s"], t["right"], info)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
