"""`svdllm.quantize`: a model (compressed by svdllm, or dense) quantized by a QuantizeConfig (config.py) and saved.

The quantization itself is quantization/quantize.py; this is the job around it: read the model, check it is not
quantized already, draw GPTQ's calibration windows, record what was done in the manifest and write the directory.
It lives in io/ beside export.py, which does the same for a change of format, because it reads and writes model
directories: io/ imports quantization/ (the on-disk form of quantized weights), so quantization/ cannot import io/.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.sources import describe
from ..errors import SvdllmError
from .checkpoint import check_out_dir, load, save
from .manifest import Manifest, is_model_dir, read_manifest


@dataclass
class QuantizeResult:
    """What svdllm.quantize did: the manifest's record of the quantization (`info`: scheme, method, matrices, bits
    per weight, ...), the whole manifest, where it was saved and the bytes of its weights there (None: not saved),
    and the quantized model and its tokenizer."""

    info: dict
    manifest: dict = field(repr=False)
    out: Path | None = None
    bytes_on_disk: int | None = None
    model: nn.Module | None = field(default=None, repr=False)
    tokenizer: object = field(default=None, repr=False)

    def summary(self) -> dict:
        """The record without its per-matrix group sizes: what `svdllm quantize --json` prints."""
        return {k: v for k, v in self.info.items() if k != "groups"}


def weights_bytes(directory: str | os.PathLike) -> int:
    """Bytes of the safetensors weights in a model directory."""
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def quantize(model_or_path, config, out: str | os.PathLike | None = None, overwrite: bool = False,
             progress: bool = True, *, tokenizer=None, manifest: dict | None = None) -> QuantizeResult:
    """Quantize a model's decoder linears (both factors of every low-rank layer) by `config` (a QuantizeConfig),
    and save it to `out` if given.

    model_or_path: a directory written by svdllm.compress (read with its manifest), any model svdllm.load_model
    takes (a dense model, loaded in float32: the comparison at equal memory), or a model in memory with its
    `tokenizer`; a compressed model in memory is saved only with its `manifest` (CompressionResult.manifest), a
    dense one gets a manifest of its own. A model in memory is quantized in place."""
    from .. import __version__
    from ..quantization import quantize_and_report

    config.validate()  # a bad scheme, group size or calibration fails before the model is read
    if out is not None:
        check_out_dir(out, overwrite)
    low_rank = False
    if isinstance(model_or_path, nn.Module):
        from ..nn.low_rank import LowRankLinear

        model, source = model_or_path, getattr(model_or_path.config, "name_or_path", None) or None
        low_rank = manifest is None and any(isinstance(m, LowRankLinear) for m in model.modules())
        if low_rank and out is not None:
            raise SvdllmError("This model holds low-rank layers: to save it quantized, pass its manifest "
                              "(manifest=CompressionResult.manifest), or quantize the directory it was saved to.")
    else:
        source = str(model_or_path)
        if is_model_dir(source):
            manifest = read_manifest(source)
            if manifest.get("quantization"):
                raise SvdllmError(f"{source} is already quantized ({manifest['quantization']['scheme']}).")
            model, tokenizer = load(source, with_tokenizer=True)
        else:
            from .loader import load_model

            model, tokenizer = load_model(source, "float32")
    if low_rank:  # in memory only: how it was compressed is not known here
        manifest = {}
    elif manifest is None:  # a dense model: quantized without factorization
        n = sum(p.numel() for p in model.parameters())
        manifest = Manifest(svdllm_version=__version__, base_model=source, model_type=model.config.model_type,
                            method="dense", ratio=0.0, ranks={},
                            params={"model_before": n, "model_after": n, "achieved_ratio": 0.0}).to_dict()
    elif manifest.get("quantization"):
        raise SvdllmError(f"{source or 'The model'} is already quantized ({manifest['quantization']['scheme']}).")
    manifest = dict(manifest)
    windows = None
    cal = config.calibration
    if config.method == "gptq":
        if tokenizer is None and not isinstance(cal.dataset, torch.Tensor):
            raise SvdllmError("GPTQ tokenizes its calibration text: pass the model's tokenizer (tokenizer=...), or "
                              "token windows as the calibration dataset.")
        from ..data.windows import calibration_set

        windows = calibration_set(tokenizer, cal.dataset, cal.nsamples, cal.seqlen, cal.seed, cal.data_dir)
    info = quantize_and_report(model, config.scheme, config.group_size, config.method, windows,
                               {"dataset": describe(cal.dataset)[0], "nsamples": cal.nsamples, "seqlen": cal.seqlen,
                                "seed": cal.seed}, progress=progress)
    manifest.update(quantization=info, dtype="float32", source=source)
    result = QuantizeResult(info, manifest, model=model, tokenizer=tokenizer)
    if out is not None:
        result.out = save(model, tokenizer, out, manifest, overwrite=overwrite)
        result.bytes_on_disk = weights_bytes(out)
    return result
