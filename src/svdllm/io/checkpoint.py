"""A compressed model on disk: the base model's config.json and tokenizer, the weights as safetensors (the
low-rank layers as `<name>.u.weight` / `<name>.v.weight`) and `svdllm_manifest.json` with every matrix's rank.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place at the end, so an
interrupted save leaves no half-written model behind.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import SvdllmError
from ..nn.low_rank import LowRankLinear
from ..models.families import family_of, from_record, set_submodule, use_family
from ..quantization.formats import flatten_state, unflatten_state
from ..quantization.quantize import is_quantized
from ..utils.atomic import readable_as_usual
from .hf_native import MODELING_FILE, model_card, modeling_source, native_config, strip_native
from .manifest import MANIFEST_NAME, read_manifest, stamped

log = logging.getLogger(__name__)


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise SvdllmError(f"Output directory {out} already exists; pass --overwrite to replace it.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SvdllmError(f"Cannot create the parent of the output directory {out}: {e}") from e
    if not os.access(out.parent, os.W_OK):
        raise SvdllmError(f"Output directory {out.parent} is not writable; choose another --out.")


def check_out_dir(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Fail before hours of work if the result could not be saved there."""
    _prepare_out_dir(Path(out), overwrite)


def save(model: nn.Module, tokenizer, out: str | os.PathLike, manifest: dict, overwrite: bool = False,
         compressor=None) -> Path:
    """Write the model atomically. `compressor`: compressed-tensors' ModelCompressor of a model whose quantized
    weights were exported to its format (io/compressed_tensors.py); it writes config.json's quantization_config."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out = Path(out)
    _prepare_out_dir(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the embeddings; re-tied on load
        state = {k: v.detach() if is_quantized(v) else v.detach().contiguous() for k, v in state.items()}
        state, quant_meta = flatten_state(state)  # torchao's quantized tensors as plain entries + metadata
        split = split_torch_state_dict_into_shards(state, max_shard_size="5GB")
        for filename, names in split.filename_to_tensors.items():
            save_file({n: state[n].contiguous() for n in names}, tmp / filename,
                      metadata={"format": "pt", **(quant_meta or {})})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _write_beside_weights(tmp, model, tokenizer, manifest)
        if compressor is not None:
            compressor.update_config(tmp)
        _move_into_place(tmp, out)
    except OSError as e:
        raise SvdllmError(f"Saving to {out} failed ({e}); nothing was written there.") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("Saved the compressed model to %s", out)
    return out


def _write_beside_weights(tmp: Path, model: nn.Module, tokenizer, manifest: dict) -> None:
    # config.json with the rank map and auto_map, and the modeling file: loadable by plain transformers. Not for
    # torchao's quantized weights: they are flattened entries, which only svdllm.load rebuilds
    config = native_config(model, manifest.get("ranks", {}))
    quantization = manifest.get("quantization") or {}
    if quantization and quantization.get("format") != "compressed-tensors":
        del config.auto_map
    else:
        (tmp / MODELING_FILE).write_text(modeling_source(model))
    config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    manifest = stamped(manifest)
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    (tmp / "README.md").write_text(model_card(manifest))


def _move_into_place(tmp: Path, out: Path) -> None:
    readable_as_usual(tmp)  # mkdtemp made it private
    if out.exists():  # --overwrite: swap the old directory out only once the new one is complete
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


class LayerwiseWriter:
    """A model directory written one decoder layer at a time (one safetensors shard per layer, an index, the rest
    at the end), so that a layer-wise compression never holds the compressed model in memory. Nothing appears at
    `out` until `finish`; `abort` removes the partial shards."""

    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out)
        _prepare_out_dir(self.out, overwrite)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.weight_map: dict[str, str] = {}
        self.total = 0
        _OPEN_WRITERS.add(self)

    def add(self, filename: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        try:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, self.tmp / filename,
                      metadata={"format": "pt"})
        except OSError as e:
            self.abort()
            raise SvdllmError(f"Writing {filename} for {self.out} failed ({e}); nothing was written there.") from e
        self.weight_map.update({k: filename for k in tensors})
        self.total += sum(v.numel() * v.element_size() for v in tensors.values())

    def finish(self, model: nn.Module, tokenizer, manifest: dict, rest: dict[str, torch.Tensor]) -> Path:
        self.add("model-rest.safetensors", rest)
        try:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            _write_beside_weights(self.tmp, model, tokenizer, manifest)
            _move_into_place(self.tmp, self.out)
        except OSError as e:
            self.abort()
            raise SvdllmError(f"Saving to {self.out} failed ({e}); nothing was written there.") from e
        _OPEN_WRITERS.discard(self)
        log.info("Saved the compressed model to %s", self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        _OPEN_WRITERS.discard(self)


_OPEN_WRITERS: set[LayerwiseWriter] = set()


def abort_open_writers() -> None:
    """Remove the partial output of every unfinished layer-wise save (after an error or an interruption)."""
    for writer in list(_OPEN_WRITERS):
        writer.abort()


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SvdllmError(f"No .safetensors weights in {path}; the directory is incomplete.")
    state, metadata = {}, {}
    for f in files:
        try:
            state.update(load_file(f))
            with safe_open(f, "pt") as handle:
                metadata.update(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise SvdllmError(f"The weights file {f} is damaged or truncated ({e}).") from e
    if "tensor_names" in metadata:  # quantized weights, flattened by torchao
        try:
            state = unflatten_state(state, metadata)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise SvdllmError(f"The quantized weights in {path} cannot be rebuilt ({e}); the files are damaged.") from e
    return state


def apply_ranks(model: nn.Module, ranks: dict[str, int | None], dtype=None, device=None) -> None:
    """Replace every listed linear by an (uninitialised) LowRankLinear of its rank."""
    for name, rank in ranks.items():
        if rank is None:
            continue
        try:
            dense = model.get_submodule(name)
        except AttributeError as e:
            raise SvdllmError(f"The manifest names {name}, which this model does not have.") from e
        if not isinstance(dense, nn.Linear):
            raise SvdllmError(f"The manifest names {name}, which is not a linear layer of this model.")
        if rank > min(dense.in_features, dense.out_features):
            raise SvdllmError(f"The manifest gives {name} rank {rank}, more than its shape "
                              f"{dense.out_features} × {dense.in_features} allows; the directory is damaged.")
        low = LowRankLinear(dense.in_features, dense.out_features, int(rank), bias=dense.bias is not None,
                            device=device or dense.weight.device, dtype=dtype or dense.weight.dtype)
        set_submodule(model, name, low)


def _check_config_against_weights(config, family, state: dict, path: Path) -> None:
    """The sizes that decide how big a model gets built must agree with the weights, before anything is built."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = {i for i in map(family.layer_index, state) if i is not None}
    embed = next((v for k, v in state.items() if k.endswith(("embed_tokens.weight", "embed_in.weight"))), None)
    checks = [("num_hidden_layers", getattr(text, "num_hidden_layers", None), len(layers))]
    if embed is not None:
        checks += [("vocab_size", getattr(text, "vocab_size", None), embed.shape[0])]
        if getattr(text, "word_embed_proj_dim", None) is None:  # OPT-350m embeds in a smaller space
            checks += [("hidden_size", getattr(text, "hidden_size", None), embed.shape[-1])]
    for field_name, value, actual in checks:
        if value != actual:
            raise SvdllmError(f"The config.json in {path} says {field_name} = {value!r}, but the weights have "
                              f"{actual}; the directory is damaged.")


def load(path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | None = None,
         with_tokenizer: bool = False):
    """Rebuild a model saved by svdllm. Returns the model (and its tokenizer with `with_tokenizer=True`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..models.loading import parse_dtype

    path = Path(path)
    if not path.is_dir():
        raise SvdllmError(f"Model directory {path} does not exist.")
    manifest = read_manifest(path)
    if (manifest.get("quantization") or {}).get("format") == "compressed-tensors":
        raise SvdllmError(f"{path} is a compressed-tensors export, for transformers and the runtimes that read that "
                          "format: AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True). svdllm.load "
                          "reads the directory it was exported from.")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers and huggingface_hub raise many types for a bad config.json
        raise SvdllmError(f"The config.json in {path} cannot be read ({type(e).__name__}: {e}).") from e
    family = from_record(manifest["family"]) if manifest.get("family") else family_of(config)
    strip_native(config)
    dtype = parse_dtype(dtype) if dtype is not None else parse_dtype(manifest.get("dtype", "float32"))
    state = _read_weights(path)
    _check_config_against_weights(config, family, state, path)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:  # a config that parses but describes no buildable model
        raise SvdllmError(f"The config.json in {path} describes no model transformers can build "
                          f"({type(e).__name__}: {e}).") from e
    if family.experts:
        from ..models.experts import unfuse_experts

        unfuse_experts(model)  # as the model was compressed: one linear pair per expert
    apply_ranks(model, manifest["ranks"], dtype=dtype, device="meta")
    expected = set(model.state_dict().keys())
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise SvdllmError(
            f"The weights in {path} do not match its manifest and config: missing {sorted(missing)[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}."
        )
    shapes = model.state_dict()
    for k, v in state.items():
        if tuple(v.shape) != tuple(shapes[k].shape):
            raise SvdllmError(f"The weight {k} in {path} has shape {tuple(v.shape)}, expected {tuple(shapes[k].shape)}.")
    model.load_state_dict({k: v if is_quantized(v) else v.to(dtype) for k, v in state.items()}, strict=False,
                          assign=True)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    if manifest.get("family"):
        use_family(model, family)
    if device is not None:
        model.to(device)
    model.eval()
    if with_tokenizer:
        return model, AutoTokenizer.from_pretrained(path)
    return model
