"""On-disk cache of calibration statistics, keyed by everything they depend on.

A later run with the same model, data, sample count, length, seed and mode skips the calibration pass. Each
layer is its own file, written atomically, so an interrupted pass never leaves a corrupt entry behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..utils.atomic import atomic_path, atomic_write_text
from ..models.families import family_of
from .fisher import GradientStats, LayerGradients
from . import distributed
from .layerwise import LayerStats
from .walk import Walk

log = logging.getLogger(__name__)
STATS_VERSION = 2  # bump when the meaning of a cached statistic changes


def model_fingerprint(model) -> str:
    """Identify the weights: the config and the bytes of every tensor, so that a fine-tune that changed any layer
    never reads the statistics of the model it came from. It costs one read of the weights (SmolLM2-135M: 2.5 s on
    2 busy CPU cores; a 16 GB checkpoint about a minute, against hours of compression); a layer-wise model reads
    each layer from its checkpoint in turn. Tied weights are read once."""

    h = hashlib.blake2b(model.config.to_json_string(use_diff=False).encode(), digest_size=16)

    def add(name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)

    layers = family_of(model).decoder_layers(model)
    seen = {id(t) for layer in layers for t in layer.state_dict(keep_vars=True).values()}
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        if id(t) not in seen:  # embeddings, final norm, head (a tied head is the embedding: once)
            seen.add(id(t))
            add(name, t)
    for step in Walk(model, progress=False).steps():  # each layer resident in turn (a layer-wise model's too)
        for name, t in sorted(step.layer.state_dict().items()):
            add(f"layer{step.i}.{name}", t)
    return h.hexdigest()[:16]


def _digest(key: dict, length: int) -> str:
    """A cache entry's name from everything its content depends on."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:length]


class LazyTensors(Mapping):
    """A safetensors file read one tensor at a time: the output-gradient Grams of a whole model (1.3 GB for
    SmolLM2-135M, m² doubles per linear) stay on disk until the factorization reaches their layer."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        with safe_open(path, framework="pt") as f:
            self._keys = list(f.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self._keys:
            raise KeyError(key)
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class StatsCache:
    def __init__(self, root: str | os.PathLike, key: dict):
        self.key = dict(key, stats_version=STATS_VERSION)
        self.dir = Path(root) / "stats" / _digest(self.key, 20)

    def _layer_path(self, i: int) -> Path:
        return self.dir / f"layer_{i:04d}.safetensors"

    def has(self, i: int) -> bool:
        return self._layer_path(i).exists()

    # Under torchrun every rank writes its (identical, all-reduced) statistics itself, and a cache entry is used
    # only if every rank can read it: ranks that disagreed would wait for each other in different collectives.
    def has_all(self, num_layers: int) -> bool:
        return distributed.all_agree(all(self.has(i) for i in range(num_layers)))

    def load_if_present(self, i: int) -> LayerStats | None:
        """Layer i's statistics if an earlier (possibly interrupted) run left them, else None."""
        return self.load(i) if distributed.all_agree(self.has(i)) else None

    def save(self, i: int, stats: LayerStats) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "key.json"
        if not meta.exists():
            atomic_write_text(meta, json.dumps(self.key, indent=1, sort_keys=True))
        tensors = {f"gram.{k}": v.contiguous() for k, v in stats.grams.items()}
        tensors.update({f"abs_sum.{k}": v.contiguous() for k, v in stats.abs_sums.items()})
        with atomic_path(self._layer_path(i)) as tmp:
            save_file(tensors, tmp, metadata={"tokens": str(stats.tokens)})

    def _gradient_path(self, windows: int) -> Path:
        return self.dir / f"gradients_{windows}.safetensors"

    def _gram_path(self, windows: int) -> Path:  # every Gram in one file (caches written before version 0.x)
        return self.dir / f"gradient_grams_{windows}.safetensors"

    def gradient_dir(self, windows: int, output_grams: bool, gram_dtype: str = "float64") -> Path:
        """Where the gradient pass writes its results layer by layer (and resumes from, if interrupted)."""
        grams = "" if not output_grams else "_grams" if gram_dtype == "float64" else f"_grams_{gram_dtype}"
        return self.dir / f"gradient_pass_{windows}{grams}"

    def _save_atomic(self, tensors: dict, path: Path) -> None:
        with atomic_path(path) as tmp:
            save_file(tensors, tmp)

    def save_gradients(self, grads: GradientStats) -> None:
        """The row Fisher and output diagonals of every linear in one small file, which marks the pass complete;
        the Grams stay in the pass's per-layer files."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"rows.{k}": v.contiguous() for k, v in grads.rows.items()}
        tensors.update({f"outputs.{k}": v.contiguous() for k, v in grads.outputs.items()})
        self._save_atomic(tensors, self._gradient_path(grads.windows))

    def load_gradients(self, windows: int, num_layers: int, output_grams: bool = False,
                       gram_dtype: str = "float64") -> GradientStats | None:
        path = self._gradient_path(windows)
        grams = None
        if output_grams:
            grams = LayerGradients(self.gradient_dir(windows, True, gram_dtype))
            if not grams.complete(num_layers):
                old = self._gram_path(windows)
                grams = LazyTensors(old) if gram_dtype == "float64" and old.exists() else None
        if not distributed.all_agree(path.exists() and (not output_grams or grams is not None)):
            return None
        t = load_file(path)
        pick = lambda prefix: {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}  # noqa: E731
        return GradientStats(pick("rows."), pick("outputs."), windows, grams)

    def load(self, i: int) -> LayerStats:
        from safetensors import safe_open

        path = self._layer_path(i)
        with safe_open(path, framework="pt") as f:
            tokens = int(f.metadata()["tokens"])
        tensors = load_file(path)
        pick = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        return LayerStats(pick("gram."), pick("abs_sum."), tokens)


class AllocationRecord:
    """The ranks (the widths of a joint allocation, and what the allocator reported) that a spectral allocation chose from these statistics, per
    ratio: the spectra, and for `global` the measured loss scales, cost minutes; a rerun of the same configuration,
    the same one with another parameter update, or a run that shares a ratio with this one reads them back (each
    ratio's ranks depend on that ratio alone). Keyed by everything the ranks depend on besides the statistics and
    the ratio, whose directory holds the record."""

    def __init__(self, cache: StatsCache, key: dict):
        self.key = key
        self.path = cache.dir / f"allocation_{_digest(key, 16)}.json"

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {"ranks": {}, "info": {}}

    def load(self, ratios: list[float]) -> dict[float, dict] | None:
        """ratio -> the allocation as `save` got it (ranks, info, and for a joint allocation bits and linear_bytes)
        if every ratio is recorded (on every rank), else None."""
        record = self._read()
        if not distributed.all_agree(all(str(r) in record["ranks"] for r in ratios)):
            return None
        return {r: {"ranks": record["ranks"][str(r)], "info": record["info"].get(str(r), {}),
                    "bits": record.get("bits", {}).get(str(r)), "linear_bytes": record.get("linear_bytes", {}).get(str(r))}
                for r in ratios}

    def save(self, allocations: dict[float, dict]) -> None:
        """Record each ratio's allocation (a dict of ranks, info, bits and linear_bytes, as Allocation.to_dict)."""
        if not distributed.is_main():
            return
        record = self._read()
        record["key"] = self.key
        for part in ("ranks", "info", "bits", "linear_bytes"):
            record.setdefault(part, {}).update({str(r): a[part] for r, a in allocations.items()
                                                if a.get(part) is not None or part in ("ranks", "info")})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(record, default=str))
