"""Configuration as plain dataclasses: what the CLI parses, the Python API takes, and the manifest records.

The configs of the jobs that read calibration text live here: CalibrationConfig, CompressConfig (svdllm.compress) and
QuantizeConfig (svdllm.quantize). The two others live beside the function that takes them, in packages that sit below
this module in the import order: ExportConfig in io/export.py (svdllm.export), EvalConfig in evaluation/api.py
(svdllm.evaluate). Each config's `validate()` is the one place its values are checked, before any model is loaded;
it raises SvdllmError naming the problem and the fix."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.sources import check_source
from .data.texts import split_sources
from .errors import SvdllmError

CALIBRATION_MODES = ("original", "sequential")

# What a compression does when no method/allocation/update is named, in the library and the CLI alike. "best" is
# the lowest WikiText-2 perplexity for the size measured so far on SmolLM2-135M (BENCHMARKS.md: kfac-svd with the
# global allocator); "paper" is SVD-LLM (W) as the paper evaluates it.
PRESETS = {
    "best": {"method": "kfac-svd", "alloc": "global", "update": "none"},
    "paper": {"method": "svd-llm", "alloc": "uniform", "update": "none"},
}
# "best" where its first choice cannot run: the next best measured configuration that can
BEST_WITHOUT_OUTPUT_GRAMS = {"method": "svd-llm", "alloc": "global"}  # the next best in BENCHMARKS.md
# "best" from this ratio up also takes the closed-form update: on kfac-svd + global it changes nothing at R = 0.2 and
# 0.4 but takes 15% off at R = 0.6, where the inputs drift most; it costs one more calibration pass per ratio
# (BENCHMARKS.md, "The default, measured"). Decided per ratio: the ratios below share one pass.
BEST_CLOSED_FORM_FROM = 0.5
GRAM_DISK_FRACTION = 1 / 2  # the rest of the free disk is for the input statistics and the decompositions
GRAM_BYTES = {"float64": 8, "float32": 4}  # kfac-svd's output Grams on disk, bytes per entry


def free_disk(path) -> int | None:
    """Bytes free on the file system that holds `path` (its nearest existing parent), or None if unknown."""
    import shutil
    from pathlib import Path

    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def resolve_best(chosen: dict, named: set[str], gram_bytes: int, free_bytes: int | None) -> tuple[dict, str | None]:
    """The "best" preset adjusted to what this run can do, and why it was adjusted (None: not adjusted).

    kfac-svd writes one m × m output-gradient Gram per linear to disk, a layer at a time, and reads one at a time:
    memory is never the limit, the disk under the statistics cache may be. In float64 (`gram_bytes`) they take 1.3 GB
    for SmolLM2-135M and 119 GB for a Llama-3-8B (3.7 GB per layer, measured on the 8B-shaped model). Where that is
    more than half the free disk, they are stored in float32 (half the bytes; they are still summed in float64 and
    read back as float64: BENCHMARKS.md measures what the rounding costs); where even that does not fit, the next
    best method that needs no Grams. Only what came from the preset is replaced: a method, allocator or Gram dtype the
    user named is kept (and fails clearly if it cannot run)."""
    out = dict(chosen)
    if out["method"] != "kfac-svd" or free_bytes is None:
        return out, None
    dtype = out.get("gram_dtype") or "float64"
    need = gram_bytes * GRAM_BYTES[dtype] // 8
    if need <= GRAM_DISK_FRACTION * free_bytes:
        return out, None
    where = (f"more than half of the {free_bytes / 2**30:.1f} GiB free under the statistics cache (--cache-dir or "
             "SVDLLM_CACHE_DIR on a larger disk keeps the default)")
    if "gram_dtype" not in named and dtype == "float64" and gram_bytes // 2 <= GRAM_DISK_FRACTION * free_bytes:
        out["gram_dtype"] = "float32"
        return out, (f"kfac-svd's output-gradient Grams need {gram_bytes / 2**30:.1f} GiB of disk in float64, {where}; "
                     "they are stored in float32")
    if "method" in named:
        return out, None
    out.update({k: v for k, v in BEST_WITHOUT_OUTPUT_GRAMS.items() if k not in named})
    return out, f"kfac-svd's output-gradient Grams need {need / 2**30:.1f} GiB of disk in {dtype}, {where}"


@dataclass
class Plan:
    """What a CompressConfig resolves to for one model: the method and allocator, the update of each ratio, and
    why the preset's first choice was changed (None: it was not)."""

    method: str
    alloc: str
    updates: dict  # ratio -> update
    reason: str | None = None
    gram_dtype: str = "float64"  # how kfac-svd's output Grams are stored on disk

    def groups(self) -> list[tuple[str, list[float]]]:
        """(update, ratios) in the order the ratios were given: ratios with the same update share a run."""
        out: dict[str, list[float]] = {}
        for r, u in self.updates.items():
            out.setdefault(u, []).append(r)
        return list(out.items())


@dataclass
class CalibrationConfig:
    """Which text the statistics come from and how the layers see it.

    mode="original": every layer sees the dense model's activations, so one pass serves every ratio and method.
    mode="sequential": layer i sees the outputs of layers 0..i-1 *after* they were compressed, which tracks the
    compressed model more closely but ties the pass to one method and ratio.
    """

    # a source or a comma-separated mix (data/sources.py); in Python also strings or token windows given directly
    dataset: object = "wikitext2"
    nsamples: int = 64
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 1
    mode: str = "original"
    data_dir: str | None = None
    # windows for the gradient pass (fwsvd's Fisher, the dipsvd/global allocators' sensitivities; capped at nsamples):
    # a backward pass costs about three forwards, and 8 × 2048 tokens take ~3 min for SmolLM2 on 2 CPU cores
    grad_samples: int | None = 8

    def validate(self) -> None:
        if self.nsamples < 1:
            raise SvdllmError(f"--nsamples must be at least 1, got {self.nsamples}.")
        if self.seqlen < 2:
            raise SvdllmError(f"--seqlen must be at least 2 tokens, got {self.seqlen}.")
        if self.batch_size < 1:
            raise SvdllmError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.grad_samples is not None and self.grad_samples < 1:
            raise SvdllmError(f"--grad-samples must be at least 1, got {self.grad_samples}.")
        if isinstance(self.dataset, str):
            for source in split_sources(self.dataset) or [""]:
                check_source(source)
        elif not isinstance(self.dataset, torch.Tensor):  # a one-shot iterable is read once, here
            try:
                self.dataset = list(self.dataset)
            except TypeError as e:
                raise SvdllmError("CalibrationConfig.dataset is a source name (str), strings, or token windows; got "
                                  f"{type(self.dataset).__name__}.") from e
        if self.mode not in CALIBRATION_MODES:
            raise SvdllmError(f"Unknown calibration mode {self.mode!r}; choose one of {', '.join(CALIBRATION_MODES)}.")


@dataclass
class CompressConfig:
    """One compression job. `ratio` may list several ratios: one calibration pass then serves all of them."""

    ratio: float | list[float] = 0.4
    # "best" (default) or "paper": fills the method, allocator and update that are left None (resolve())
    preset: str = "best"
    method: str | None = None
    method_options: dict = field(default_factory=dict)  # e.g. {"shrink_outputs": 0.2} for kfac-svd
    alloc: str | None = None
    alloc_options: dict = field(default_factory=dict)  # e.g. {"attn_keep": 0.5} for lorap
    rank_multiple: int = 1  # round every rank to a multiple of this (8/16/32 suit fast kernels)
    update: str | None = None
    finetune: object | None = None  # an update.lora.FinetuneConfig for --update lora (None: the preset for the device)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    cache_dir: str | None = None  # None: $SVDLLM_CACHE_DIR or ~/.cache/svdllm; "" disables the statistics cache
    # kfac-svd's output-gradient Grams on disk: "float64", "float32" (half the disk), None: float64 unless the disk
    # under the cache is short (resolve_best)
    gram_dtype: str | None = None
    # which linears: regular expressions searched in each linear's full name ("model.layers.3.mlp.down_proj"); a
    # model type svdllm does not list is compressed by these alone (every nn.Linear of a decoder layer by default)
    targets: list[str] | None = None
    ignore: list[str] | None = None
    layers_path: str | None = None  # the decoder layers' ModuleList, where it cannot be found (e.g. "transformer.h")
    # rank and bit width chosen together (the global allocator): the widths a matrix may take (e.g. [3, 4, 8]), and
    # R becomes the fraction of the compressed linears' float32 bytes removed; the model is then quantized by GPTQ
    bits: list[int] | None = None
    group_size: int = 32  # input channels per scale of int4/int3 weights

    @property
    def ratios(self) -> list[float]:
        return list(self.ratio) if isinstance(self.ratio, (list, tuple)) else [self.ratio]

    def resolve(self, gram_bytes: int = 0, free_bytes: int | None = None) -> Plan:
        """The preset applied: what was not named comes from it. `best` falls back where kfac-svd's Grams do not
        fit on the disk (resolve_best) and takes the closed-form update for the ratios from BEST_CLOSED_FORM_FROM
        up, when its method and allocator are kfac-svd + global and no update was named."""
        if self.preset not in PRESETS:
            raise SvdllmError(f"Unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}.")
        base = PRESETS[self.preset]
        named = {k for k in ("method", "alloc") if getattr(self, k) is not None}
        if self.method_options:  # options are for the preset's method: keep it whatever happens below
            named.add("method")
        chosen = {k: getattr(self, k) or base[k] for k in ("method", "alloc")}
        chosen["gram_dtype"] = self.gram_dtype or "float64"
        if self.gram_dtype is not None:
            named.add("gram_dtype")
        reason = None
        if self.preset == "best":
            chosen, reason = resolve_best(chosen, named, gram_bytes, free_bytes)
        ratios = [float(r) for r in self.ratios]
        if self.bits and chosen["alloc"] != "global":
            raise SvdllmError(f"--bits chooses ranks and widths with the global allocator; --alloc {chosen['alloc']} "
                              "chooses ranks only.")
        if self.update is not None:
            updates = {r: self.update for r in ratios}
        elif self.bits:
            updates = {r: "none" for r in ratios}
        elif self.preset == "best" and (chosen["method"], chosen["alloc"]) == ("kfac-svd", "global"):
            updates = {r: "closed-form" if r >= BEST_CLOSED_FORM_FROM else "none" for r in ratios}
        else:
            updates = {r: base["update"] for r in ratios}
        return Plan(chosen["method"], chosen["alloc"], updates, reason, chosen["gram_dtype"])

    def out_dirs(self, out: str | os.PathLike | None) -> dict[float, Path | None]:
        """Where each ratio's model is saved: `out` itself for one ratio, `out/ratio-<R>` each for several."""
        ratios = [float(r) for r in self.ratios]
        if out is None:
            return {r: None for r in ratios}
        return {r: Path(out) if len(ratios) == 1 else Path(out) / f"ratio-{r:g}" for r in ratios}

    def validate(self, out: str | os.PathLike | None = None, overwrite: bool = False) -> Plan:
        """Everything that can be checked before the model is loaded, in one place (the CLI calls it before loading
        the model, svdllm.compress at its start): the values, the preset resolved, the method and allocator with
        their options, the update, and with `out` the output directories (see out_dirs). Returns the plan as the
        preset resolves it without the model (compress resolves it again with the model's disk needs)."""
        self._check_values()
        plan = self.resolve()
        from .allocation import get_allocator
        from .factorization import get_method
        from .update import UPDATES

        for update in plan.updates.values():
            if update not in UPDATES:
                raise SvdllmError(f"Unknown update {update!r}; available: {', '.join(UPDATES)}.")
        get_method(plan.method, **self.method_options)  # unknown methods and options too
        get_allocator(plan.alloc, **self.alloc_options)
        if out is not None:
            from .io.checkpoint import check_out_dir

            for o in self.out_dirs(out).values():
                check_out_dir(o, overwrite)
        return plan

    def _check_values(self) -> None:
        if self.preset not in PRESETS:
            raise SvdllmError(f"Unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}.")
        if not self.ratios:
            raise SvdllmError("No compression ratio given; pass --ratio, e.g. --ratio 0.4.")
        for r in self.ratios:
            if not isinstance(r, (int, float)) or not 0.0 < float(r) < 1.0:
                raise SvdllmError(
                    f"Compression ratio {r!r} is outside (0, 1): it is the fraction of the compressed matrices' "
                    "parameters to remove, e.g. --ratio 0.4 removes 40%."
                )
        if len(set(self.ratios)) != len(self.ratios):
            raise SvdllmError(f"Ratio listed twice in {self.ratios}; list each ratio once.")
        if self.rank_multiple < 1:
            raise SvdllmError(f"--rank-multiple must be a positive integer, got {self.rank_multiple}.")
        import re

        for flag, patterns in (("--targets", self.targets), ("--ignore", self.ignore)):
            if isinstance(patterns, str):
                raise SvdllmError(f"{flag} takes a list of regular expressions, got the string {patterns!r}.")
            for pattern in patterns or []:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise SvdllmError(f"{flag} {pattern!r} is not a regular expression: {e}.") from None
        if self.bits is not None:
            if not self.bits or any(b not in (3, 4, 8) for b in self.bits):
                raise SvdllmError(f"--bits takes widths among 3, 4 and 8 (e.g. --bits 3,4,8), got {self.bits}.")
            if self.update not in (None, "none"):
                raise SvdllmError("--bits quantizes the model right after its truncation: it takes no update "
                                  f"(got --update {self.update}).")
        if self.group_size < 8 or self.group_size & (self.group_size - 1):
            raise SvdllmError(f"--group-size must be a power of two ≥ 8, got {self.group_size}.")
        if self.gram_dtype is not None and self.gram_dtype not in GRAM_BYTES:
            raise SvdllmError(f"--gram-dtype {self.gram_dtype!r} is not one of {', '.join(GRAM_BYTES)}.")
        self.calibration.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class QuantizeConfig:
    """One weight-only quantization (svdllm.quantize): int8 (one scale per output channel), int4 or int3 (one scale
    per `group_size` input channels), by round-to-nearest ("rtn", no data) or GPTQ ("gptq", which reads
    `calibration`: its text, window count, length and seed)."""

    scheme: str = "int8"
    group_size: int = 32
    method: str = "rtn"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def validate(self) -> None:
        from .quantization import METHODS, SCHEMES

        if self.scheme not in SCHEMES:
            raise SvdllmError(f"Unknown quantization scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)} "
                              "(--scheme).")
        if self.method not in METHODS:
            raise SvdllmError(f"Unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)} "
                              "(--method).")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 8 \
                or self.group_size & (self.group_size - 1):
            raise SvdllmError(f"--group-size must be a power of two ≥ 8, got {self.group_size}.")
        if self.method == "gptq":  # round-to-nearest reads no data
            self.calibration.validate()
