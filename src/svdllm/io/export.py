"""`svdllm.export`: a model directory written by svdllm, written again in another form for other tools.

  dense               a plain Hugging Face checkpoint, each factor pair multiplied back (W = W_u·W_v), for tools
                      that take only dense models (not of a quantized model: quantize the dense export instead)
  compressed-tensors  a quantized model's codes in that format, which plain transformers loads (with
                      trust_remote_code=True for the low-rank layers; quantization/compressed_tensors.py)

Both writes are atomic, as `save`'s: an existing `out` (with overwrite) is replaced only once the new one is complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SvdllmError
from .checkpoint import _move_into_place, check_out_dir, load, save
from .manifest import read_manifest

FORMATS = {"dense": "a plain Hugging Face checkpoint, the factors multiplied back",
           "compressed-tensors": "a quantized model's codes in compressed-tensors, for plain transformers"}


@dataclass
class ExportConfig:
    """Which form svdllm.export writes: "dense" or "compressed-tensors" (FORMATS)."""

    format: str | None = None

    def validate(self) -> None:
        if self.format is None:
            raise SvdllmError("Say which form to export: --dense (factors multiplied back) or --format "
                              "compressed-tensors (a quantized model's codes, for transformers).")
        if self.format not in FORMATS:
            raise SvdllmError(f"Unknown export format {self.format!r}; choose one of {', '.join(FORMATS)} (--format).")


def export(run_dir: str | os.PathLike, out: str | os.PathLike, config: ExportConfig | str | None,
           overwrite: bool = False) -> dict:
    """Write the model saved in `run_dir` to `out` in the form `config` names (an ExportConfig, or the format's
    name). Returns what was written: the paths, and the parameter count (dense) or the weights' bytes on disk
    (compressed-tensors)."""
    config = config if isinstance(config, ExportConfig) else ExportConfig(config)
    config.validate()
    check_out_dir(out, overwrite)
    manifest = read_manifest(run_dir)
    if config.format == "compressed-tensors":
        return _compressed_tensors(run_dir, out, manifest, overwrite)
    if manifest.get("quantization"):
        raise SvdllmError(f"{run_dir} is quantized; export the unquantized compressed model "
                          "(the directory `svdllm quantize` read), then quantize the dense export if you need to.")
    from .hf_native import export_dense

    model, tok = load(run_dir, with_tokenizer=True)
    export_dense(model)
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _move_into_place(tmp, out)  # an existing --overwrite target is swapped out only once this one is complete
    except OSError as e:
        raise SvdllmError(f"Writing the dense export to {out} failed ({e}); nothing was written there.") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    params = sum(p.numel() for p in model.parameters())
    return {"run_dir": str(run_dir), "out": str(out), "params": params}


def _compressed_tensors(run_dir, out, manifest: dict, overwrite: bool) -> dict:
    from ..quantization.compressed_tensors import to_compressed_tensors
    from .quantize import weights_bytes

    if not manifest.get("quantization"):
        raise SvdllmError(f"{run_dir} is not quantized: run `svdllm quantize --model {run_dir} ...` "
                          "first, then export what it writes.")
    model, tok = load(run_dir, with_tokenizer=True)
    compressor = to_compressed_tensors(model)
    quantization = {**manifest["quantization"], "format": "compressed-tensors"}
    save(model, tok, out, {**manifest, "quantization": quantization, "source": str(run_dir)},
         overwrite=overwrite, compressor=compressor)
    return {"format": "compressed-tensors", "run_dir": str(run_dir), "out": str(out),
            "bytes_on_disk": weights_bytes(out)}
