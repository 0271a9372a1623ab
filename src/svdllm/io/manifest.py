"""svdllm_manifest.json: how a compressed model was made (enough to make it again) and what it holds (every rank).
Written from a `Manifest` and read back, checked, by `read_manifest`, here only."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SvdllmError

MANIFEST_NAME = "svdllm_manifest.json"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    svdllm_version: str
    model_type: str
    ranks: dict[str, int | None]  # every compressed linear's rank (None: kept dense)
    method: str  # "dense" for a model quantized without factorization
    ratio: float
    params: dict  # linear_dense, linear_kept, achieved_ratio, model_before, model_after
    base_model: str | None = None
    source_model: dict = field(default_factory=dict)  # hub id and license, where known
    dtype: str = "float32"
    preset: str | None = None
    method_options: dict = field(default_factory=dict)
    alloc: str | None = None
    alloc_options: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)  # what the allocator measured and chose (global: its rounds)
    # --bits: the widths the joint allocation chose among ({"bits": [3, 4, 8], "group_size": 32}), and then R is the
    # fraction of the compressed linears' float32 bytes removed, not of their parameters
    widths: dict | None = None
    ratio_of: str = "parameters"  # or "float32 bytes"
    rank_multiple: int = 1
    update: str = "none"
    calibration: dict = field(default_factory=dict)
    gram_dtype: str | None = None  # how kfac-svd's output-gradient Grams were stored (None: the method needs none)
    timings: dict = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    truncation_loss: dict[str, float] = field(default_factory=dict)
    whitening_jitter: dict[str, float] = field(default_factory=dict)
    update_error_reduction: dict[str, float] = field(default_factory=dict)
    created: str | None = None
    environment: dict = field(default_factory=dict)  # torch, transformers, python, threads
    # the layout of a model compressed by --targets/--ignore/--layers-path (None: its model type's listed family)
    family: dict | None = None

    def to_dict(self) -> dict:
        """The manifest as `save` writes it (later steps add their own entries: finetune, quantization)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def stamped(manifest: dict) -> dict:
    """The manifest with the format entries every saved one carries."""
    return dict(manifest, format="svdllm", format_version=FORMAT_VERSION)


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory written by svdllm (it holds a manifest)."""
    return os.path.isfile(os.path.join(path, MANIFEST_NAME))


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the model saved in directory `path`, checked: a damaged one is refused with the reason."""
    path = Path(path)
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise SvdllmError(f"{path} is not a model saved by svdllm: {MANIFEST_NAME} is missing.")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SvdllmError(f"The manifest {mpath} is not valid JSON ({e}); the directory is damaged.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != "svdllm" or not isinstance(manifest.get("ranks"), dict):
        raise SvdllmError(f"The manifest {mpath} is not an svdllm manifest (no format/ranks entries).")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise SvdllmError(f"The manifest {mpath} has a format_version that is not an integer ({version!r}).")
    if version > FORMAT_VERSION:
        raise SvdllmError(f"{mpath} was written by a newer svdllm (format {version}); upgrade svdllm.")
    for name, rank in manifest["ranks"].items():
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise SvdllmError(f"The manifest {mpath} gives {name} the rank {rank!r}; a rank is a positive integer "
                              "(or null for a matrix kept dense). The directory is damaged.")
    if not isinstance(manifest.get("dtype", "float32"), str):
        raise SvdllmError(f"The manifest {mpath} has a dtype that is not a name ({manifest['dtype']!r}).")
    if not isinstance(manifest.get("quantization") or {}, dict):
        raise SvdllmError(f"The manifest {mpath} has a quantization entry that is not an object.")
    if manifest.get("family") is not None and not _is_family(manifest["family"]):
        raise SvdllmError(f"The manifest {mpath} has a family entry that does not give the name, the layers' path, "
                          "the head and the input groups of its model (models/families.py); the directory is damaged.")
    return manifest


def _is_family(record) -> bool:
    """A Family.record(): name, layers and head names, groups of linear names (and optionally what was skipped)."""
    strings = lambda xs: isinstance(xs, list) and all(isinstance(x, str) for x in xs)  # noqa: E731
    return (isinstance(record, dict) and isinstance(record.get("name"), str) and isinstance(record.get("layers"), str)
            and strings(record.get("head")) and isinstance(record.get("groups"), dict) and record["groups"]
            and all(isinstance(g, str) and strings(n) and n for g, n in record["groups"].items())
            and isinstance(record.get("skipped", {}), dict))
