"""The orchestrator. `compress(model, tokenizer, config)` swaps the compressible linears of `model` for LowRankLinear
modules in place, like torchao's quantize_ or peft's get_peft_model.

The config's preset resolves into a plan (config.py): a method, an allocator and an update per ratio. The ratios
that share an update share one run of these phases over a `Run` (what each reads → what it writes):

1. windows        tokenizer, config.calibration            → run.windows, run.cache (the statistics' cache entry)
2. gradients      model, windows                           → run.grads: row Fisher, output-gradient diagonals and,
                                                              for kfac-svd, Grams (calibration/fisher.py)
3. record         the cache                                → run.ranks if this allocation was made before
4. statistics     model, windows                           → every layer's input Grams, in run.dense (a forward pass
                                                              layer by layer: calibration/layerwise.py)
5. spectra        weights, run.dense, run.grads            → run.spectra; each decomposition kept in the run's store
                                                              (factorization/spectra.py, factorization/store.py)
6. allocation     run.spectra, measure(ranks) → loss        → run.allocations: ranks, and with --bits widths
                                                              (allocation/, refine.py, joint.py)
7. factorization  the store (or weights and statistics),    → factors of every ratio, with the closed-form update in
                  run.ranks                                   a pass through the compressed model (factorization/apply.py)
8. quantize       with --bits, run.allocations' widths         → each matrix by GPTQ at its width (quantization/)
9. save           the factors (quantized)                  → one directory per ratio (io/)

Each matrix is decomposed once per compress(): the spectra phase's decompositions serve the allocation's
measurements, the factorization of every ratio, and the update groups after the first. With several ratios, one
calibration pass serves all those without an update; each ratio's model is written to its own directory and the
model is handed back dense.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .allocation import (REVISION as ALLOCATOR_REVISION, Allocation, Allocator, MatrixInfo, Widths, get_allocator,
                         param_counts)
from .calibration import distributed
from .calibration import (AllocationRecord, InputStatistics, StatsCache, Walk, capture_layer_inputs, gradient_stats,
                          layerwise_loss, linear_stats, model_fingerprint)
from .config import CompressConfig, free_disk
from .data import CORPORA, calibration_set, check_token_ids
from .data.sources import describe
from .data.texts import split_sources
from .errors import SvdllmError
from .factorization import Method, get_method
from .factorization.apply import FromStatistics, LayerFactorizer
from .factorization.spectra import decompose, spectra
from .factorization.store import DecompositionStore
from .nn.low_rank import swap_back, swap_in
from .io.checkpoint import LayerwiseWriter, abort_open_writers, save
from .io.manifest import Manifest
from .models.lazy import is_lazy, resident_bytes
from .models.families import family_of, resolve_family, set_submodule
from .models.loading import cache_root, source_metadata
from .update import DRIFT_GROUPS, base_update
from .update.closed_form import ClosedFormPass, PartialFactors, refit

log = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    ratio: float
    ranks: dict[str, int | None]
    params: dict
    truncation_loss: dict[str, float]
    timings: dict
    out: Path | None = None
    manifest: dict = field(default_factory=dict)
    originals: dict = field(default_factory=dict, repr=False)  # the dense modules, for swap_back


def matrices_of(model: nn.Module) -> list[MatrixInfo]:
    out = []
    family = family_of(model)
    for i, layer in enumerate(family.decoder_layers(model)):
        for name in family.linear_names:
            lin = layer.get_submodule(name)
            out.append(MatrixInfo(family.linear_name(i, name), lin.out_features, lin.in_features, i))
    return out


def environment() -> dict:
    """The versions and thread count a model was made with: float32 forward passes differ in their last bits
    between library versions, and the global allocator's measured secants carry such differences into the ranks."""
    import platform

    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def output_gram_bytes(model) -> int:
    """Disk taken by kfac-svd's output-gradient Grams: one m × m float64 matrix per compressed linear."""
    return sum(8 * m.out_features ** 2 for m in matrices_of(model))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far: Linux's VmHWM (ru_maxrss would carry over the peak of a parent
    that forked this process before exec), ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once


@torch.no_grad()
def check_finite_outputs(model: nn.Module, input_ids: torch.Tensor) -> None:
    logits = model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False).logits
    if not torch.isfinite(logits).all():
        raise SvdllmError("The compressed model produces NaN/inf logits; it was not saved. Try --dtype float32.")


def _stats_cache(model, config: CompressConfig, windows: torch.Tensor, root: Path | None = None) -> StatsCache | None:
    """The cache entry for these weights and these exact calibration tokens (which pin down the data, tokenizer,
    sample count, length and seed). Sequential statistics depend on the compression itself and are not cached."""
    if root is None and (config.cache_dir == "" or config.calibration.mode != "original"):
        return None
    import hashlib

    cal = config.calibration
    key = {"model": model_fingerprint(model), "tokens": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:20],
           "dataset": describe(cal.dataset)[0], "nsamples": cal.nsamples, "seqlen": cal.seqlen, "seed": cal.seed}
    if family_of(model).custom:  # fewer linears, or groups found by patterns: statistics of their own
        key["family"] = family_of(model).record()
    if root is None:
        root = Path(config.cache_dir) if config.cache_dir else cache_root()
    return StatsCache(root, key)


def _calibration_record(cal, used: bool, from_cache) -> dict:
    """The calibration as the manifest records it: the settings, and where the text came from (a file's SHA-256)."""
    label, origins = describe(cal.dataset) if used else (cal.dataset if isinstance(cal.dataset, str) else None, [])
    return dict(cal.__dict__, dataset=label, used=used, from_cache=from_cache, **({"origins": origins} if used else {}))


def _ratio_dependent(config: CompressConfig) -> bool:
    """Whether the calibration pass itself depends on how the earlier layers were compressed."""
    return config.calibration.mode == "sequential" or config.update in DRIFT_GROUPS


def compress(model: nn.Module, tokenizer, config: CompressConfig | None = None, out: str | Path | None = None,
             overwrite: bool = False, progress: bool = True) -> list[CompressionResult]:
    """Compress `model` by `config`; returns one CompressionResult per ratio (saved under `out` if given).

    The config's preset ("best" unless told otherwise) fills what it leaves None, for this model (memory, a
    layer-wise model), exactly as `svdllm compress` does: the same arguments give the same model by either road.
    With one ratio the model is left compressed in place; with several, `out` is required (one sub-directory
    `ratio-<R>` each) and the model is left dense.
    """
    config = config or CompressConfig()
    config.validate(out, overwrite)  # the values, method, allocator, update and output directories (config.py)
    resolve_family(model, config.targets, config.ignore, config.layers_path)
    ratios = [float(r) for r in config.ratios]
    if len(ratios) > 1 and out is None:
        raise SvdllmError("Several ratios need an output directory (--out): each ratio's model is saved there.")
    import tempfile

    stats_root = tempfile.gettempdir() if config.cache_dir == "" else (config.cache_dir or cache_root())
    plan = config.resolve(output_gram_bytes(model), free_disk(stats_root))
    if plan.reason:
        log.warning("--preset best: %s, so this run uses --method %s --alloc %s.", plan.reason, plan.method,
                    plan.alloc)
    if config.bits and is_lazy(model):
        raise SvdllmError("--bits quantizes the whole compressed model after its truncation, which --layerwise does "
                          "not hold in memory: compress without --bits, then `svdllm quantize` the result.")
    outs = config.out_dirs(out)
    groups = plan.groups()
    if len(groups) > 1:
        log.info("Updates per ratio: %s (the ratios without one share a calibration pass).",
                 ", ".join(f"R = {r:g}: {u}" for r, u in plan.updates.items()))
    # what the update groups share: every ratio's ranks, allocated once, and the decompositions of every matrix
    shared = {"ratios": ratios}
    results = []
    try:
        for update, rs in groups:
            concrete = dataclasses.replace(config, method=plan.method, alloc=plan.alloc, update=update,
                                           gram_dtype=plan.gram_dtype, ratio=rs if len(rs) > 1 else rs[0])
            got = _compress_concrete(model, tokenizer, concrete, {r: outs[r] for r in rs}, overwrite, progress, shared)
            if len(ratios) > 1 and len(rs) == 1:  # a group of one leaves its model in place; the run leaves it dense
                swap_back(model, got[0].originals)
            results += got
    finally:
        if "store" in shared:
            shared["store"].close()
    order = {r: k for k, r in enumerate(ratios)}
    return sorted(results, key=lambda res: order[res.ratio])


def _compress_concrete(model, tokenizer, config: CompressConfig, outs: dict, overwrite: bool, progress: bool,
                       shared: dict) -> list[CompressionResult]:
    """One method, allocator and update (all named) for the ratios of `outs`."""
    ratios = [float(r) for r in config.ratios]
    if base_update(config.update) != config.update:
        return _compress_then_finetune(model, tokenizer, config, outs, overwrite, progress, shared)
    if _ratio_dependent(config) and len(ratios) > 1:
        log.info("Sequential calibration and the closed-form update depend on the ratio: one pass per ratio.")
        results = []
        for r in ratios:
            one = dataclasses.replace(config, ratio=r)
            results += _compress_concrete(model, tokenizer, one, {r: outs[r]}, overwrite, progress, shared)
            swap_back(model, results[-1].originals)
        return results
    run = Run(model, tokenizer, config, get_method(config.method, **config.method_options),
              get_allocator(config.alloc, **config.alloc_options), outs, overwrite, progress, shared)
    try:
        return _run_phases(run)
    except BaseException:
        abort_open_writers()  # a layer-wise save leaves no partial directory behind
        raise
    finally:
        if run.scratch is not None:
            run.scratch.cleanup()


def _compress_then_finetune(model, tokenizer, config, outs, overwrite, progress, shared):
    """Truncate (and closed-form update) as asked, then the sequential LoRA fine-tuning of each ratio's model."""
    if distributed.active():
        raise SvdllmError("--update lora runs in one process: compress under torchrun, then `svdllm finetune`.")
    from .io.checkpoint import load
    from .update.lora import default_config, finetune_and_save

    ft = config.finetune or default_config(next(model.parameters()).device, data_dir=config.calibration.data_dir)
    ft.validate()
    results = _compress_concrete(model, tokenizer, dataclasses.replace(config, update=base_update(config.update)),
                                 outs, overwrite, progress, shared)
    for res in results:
        # several ratios leave the model dense and each compressed one on disk; one ratio leaves it compressed here
        target = model if len(results) == 1 else load(res.out)
        history = finetune_and_save(target, tokenizer, ft, res.manifest, config.update, res.out, overwrite=True,
                                    progress=progress)
        res.timings["finetune_s"] = history["wall_s"]
    return results


@dataclass
class Run:
    """What the phases of one method, allocator and update pass to each other (see the module docstring)."""

    model: nn.Module
    tokenizer: object
    config: CompressConfig
    method: Method
    allocator: Allocator
    outs: dict  # ratio -> output directory or None
    overwrite: bool
    progress: bool
    shared: dict  # across the update groups of one compress(): "ratios", "allocations", "store"
    timings: dict = field(default_factory=lambda: {"calibration_s": 0.0, "factorization_s": 0.0})
    windows: torch.Tensor | None = None
    cache: StatsCache | None = None  # the dense statistics the factorization reads (None: its own pass gathers them)
    dense: StatsCache | None = None  # the dense statistics the spectra read (the cache, or a scratch one)
    scratch: object = None  # a temporary directory holding `dense` and the Grams when the statistics cache is off
    grads: object = None
    record: AllocationRecord | None = None
    spectra: dict | None = None
    allocations: dict[float, Allocation] | None = None  # ratio -> ranks (and widths, with --bits)

    def __post_init__(self):
        self.ratios = [float(r) for r in self.config.ratios]
        self.matrices = matrices_of(self.model)
        self.lazy = is_lazy(self.model)
        self.num_layers = len(family_of(self.model).decoder_layers(self.model))
        method, allocator = self.method.needs, self.allocator.needs
        self.closed_form = self.config.update in DRIFT_GROUPS
        self.spectral = "spectrum" in allocator  # ranks come from the decompositions, so those come first
        self.needs_inputs = "inputs" in method or self.closed_form or "inputs" in allocator
        self.needs_grams = "output_grams" in method
        self.needs_grads = "fisher" in method or "gradients" in allocator or self.needs_grams
        # --bits: each matrix's width is chosen with its rank, and the model quantized as allocated before its save
        self.widths = Widths(tuple(self.config.bits), self.config.group_size) if self.config.bits else None

    @property
    def ranks(self) -> dict | None:
        """ratio -> name -> rank (None: dense)."""
        return None if self.allocations is None else {r: a.ranks for r, a in self.allocations.items()}

    @property
    def store(self) -> DecompositionStore | None:
        return self.shared.get("store")

    @property
    def scratch_root(self) -> Path | None:
        """Where large temporary files go: under the cache root (a disk, where /tmp may be memory), or the system's
        temporary directory when the statistics cache is off."""
        return None if self.config.cache_dir == "" else Path(self.config.cache_dir or cache_root()) / "scratch"

    def scratch_dir(self) -> Path:
        """A directory of this run's own for what the statistics cache would hold when it is off (removed at the
        end of the run)."""
        if self.scratch is None:
            import tempfile

            self.scratch = tempfile.TemporaryDirectory(prefix="svdllm-run-")
        return Path(self.scratch.name)


def _run_phases(run: Run) -> list[CompressionResult]:
    config = run.config
    writers = {}
    if run.lazy:
        if any(o is None for o in run.outs.values()):
            raise SvdllmError("--layerwise writes each layer as it is compressed: give an output directory.")
        writers = {r: LayerwiseWriter(run.outs[r], run.overwrite) for r in run.ratios}
        run.timings["peak_resident_weight_mb"] = resident_bytes(run.model) / 2**20
    params_before = count_params(run.model)
    t0 = time.perf_counter()
    _windows(run)
    _gradients(run)
    if run.spectral:
        _recorded_allocation(run)
        _dense_statistics(run)
        if run.allocations is None:
            _spectra(run)
        _allocation(run)
    else:
        t = time.perf_counter()
        run.allocations = run.allocator.search(run.matrices, run.ratios, None, config.rank_multiple)
        run.timings["allocation_s"] = time.perf_counter() - t
    factorizer, from_cache = _factorization(run, writers)
    run.timings["total_s"] = time.perf_counter() - t0
    run.timings["peak_rss_mb"] = peak_rss_mb()
    if factorizer.jitters:
        worst = max(factorizer.jitters, key=factorizer.jitters.get)
        log.warning("%d Gram matrices were not positive definite and needed a jitter (largest %.3g, at %s).",
                    len(factorizer.jitters), factorizer.jitters[worst], worst)
    return _save(run, factorizer, writers, params_before, from_cache)


def _windows(run: Run) -> None:
    """Phase 1: the calibration token windows, and the cache entry of the statistics they give on these weights."""
    if not (run.needs_inputs or run.needs_grads):
        return
    cal = run.config.calibration
    run.windows = calibration_set(run.tokenizer, cal.dataset, cal.nsamples, cal.seqlen, cal.seed, cal.data_dir)
    if getattr(run.tokenizer, "chat_template", None) and isinstance(cal.dataset, str) and \
            all(s in CORPORA for s in split_sources(cal.dataset)):
        log.warning("This model has a chat template, and the calibration text (%s) has no conversations: "
                    "compressed on plain text alone, an instruct model tends to end its turn at once (SmolLM2, "
                    "--preset best at R = 0.4: 70%% of replies empty). --calib-dataset %s,alpaca keeps it "
                    "answering (BENCHMARKS.md, 'Instruct models').", cal.dataset, cal.dataset)
    check_token_ids(run.windows, run.model)
    run.cache = _stats_cache(run.model, run.config, run.windows)
    run.timings["peak_rss_after_windows_mb"] = peak_rss_mb()  # the model loaded, the text read


def _gradients(run: Run) -> None:
    """Phase 2: the gradient statistics (from the cache when this model and these windows gave them before)."""
    if not run.needs_grads:
        return
    t0 = time.perf_counter()
    cal = run.config.calibration
    n = min(cal.grad_samples or cal.nsamples, cal.nsamples)
    dtype = run.config.gram_dtype or "float64"
    grads = run.cache.load_gradients(n, run.num_layers, run.needs_grams, dtype) if run.cache is not None else None
    if grads is None:  # each layer's results to disk as the pass leaves it (resumable); Grams read back one by one
        directory = run.cache.gradient_dir(n, run.needs_grams, dtype) if run.cache is not None else \
            run.scratch_dir() / "gradients"
        grads = gradient_stats(run.model, run.windows[:n], run.progress, run.needs_grams, directory,
                               getattr(torch, dtype))
        if run.cache is not None:
            run.cache.save_gradients(grads)
    run.grads = grads
    run.timings["gradient_pass_s"] = time.perf_counter() - t0
    # ru_maxrss only grows: read after each phase, it tells which phase set the process's peak
    run.timings["peak_rss_after_gradients_mb"] = peak_rss_mb()


def _recorded_allocation(run: Run) -> None:
    """Phase 3: the ranks of this run's ratios if this compress() or an earlier run already allocated them."""
    config = run.config
    if run.needs_inputs:
        if config.cache_dir != "":  # the dense model's statistics, whatever the mode: cacheable
            run.dense = run.cache or _stats_cache(run.model, config, run.windows,
                                                  root=Path(config.cache_dir or cache_root()))
        else:  # statistics cache off: a scratch cache for this run
            run.dense = _stats_cache(run.model, config, run.windows, root=run.scratch_dir())
    if run.needs_inputs and config.cache_dir != "":
        # the allocation depends on the statistics and on what is decided here, not on the update: kept beside the
        # statistics, it serves the same configuration with another update, and an interrupted run
        run.record = AllocationRecord(run.dense, {
            "method": config.method, "method_options": config.method_options, "alloc": config.alloc,
            # every option's value, defaults included, so that a changed default is not served an old allocation
            "alloc_options": _alloc_options(run.allocator), "rank_multiple": config.rank_multiple,
            "grad_samples": config.calibration.grad_samples, "dtype": str(next(run.model.parameters()).dtype),
            "version": __version__, "allocator_revision": ALLOCATOR_REVISION,
            **({"gram_dtype": config.gram_dtype} if run.needs_grams and config.gram_dtype not in (None, "float64")
               else {}),
            **({"widths": run.widths.record()} if run.widths else {})})
    shared = run.shared.get("allocations", {})
    if all(r in shared for r in run.ratios):
        run.allocations = {r: shared[r] for r in run.ratios}
    elif run.record is not None:
        known = run.record.load(run.ratios)
        if known is not None:
            run.allocations = {r: Allocation.from_dict(a) for r, a in known.items()}
            log.info("Ranks from an earlier run's allocation (%s): the spectra are not recomputed.", run.record.path)


def _dense_statistics(run: Run) -> None:
    """Phase 4: every layer's input Grams on the dense model, into `run.dense` (resuming from any layers left). They
    serve the spectra and, without an update, the factorization; the closed-form update gathers its own in its pass
    through the compressed model."""
    if not run.needs_inputs:
        return
    t = time.perf_counter()
    cal = run.config.calibration
    if (run.allocations is None or not _ratio_dependent(run.config)) and not run.dense.has_all(run.num_layers):
        def keep(i: int, layer, stats) -> None:
            if not run.dense.has(i):
                run.dense.save(i, stats)

        Walk(run.model, run.windows, cal.batch_size, run.progress).run(
            InputStatistics(cached=run.dense.load_if_present, use=keep))
    if not _ratio_dependent(run.config):
        run.cache = run.dense  # the factorization reads the statistics back instead of running the pass again
    run.timings["calibration_s"] += time.perf_counter() - t
    run.timings["peak_rss_after_statistics_mb"] = peak_rss_mb()


def _spectra(run: Run) -> None:
    """Phase 5: every matrix decomposed on the dense statistics; spectra to the allocator, decompositions kept."""
    t = time.perf_counter()
    if "store" not in run.shared:
        run.shared["store"] = DecompositionStore(run.scratch_root)
    stats_of = run.dense.load if run.needs_inputs else (lambda i: None)
    run.spectra = spectra(run.model, run.method, stats_of, run.grads, run.store, run.progress,
                          run.widths.bits if run.widths else (), run.widths.group_size if run.widths else 32)
    run.timings["spectra_s"] = time.perf_counter() - t
    run.timings["peak_rss_after_spectra_mb"] = peak_rss_mb()


def _allocation(run: Run) -> None:
    """Phase 6: the allocator's search over every ratio of the compress() call (each ratio's ranks depend on that
    ratio alone), measuring the model's loss where it asks to."""
    if run.allocations is not None:
        return
    t = time.perf_counter()
    ratios = [r for r in run.shared["ratios"] if r not in run.shared.get("allocations", {})] or run.ratios
    n = run.allocator.measurement_windows
    measure = _measure(run, run.windows[:n]) if n and run.windows is not None else None
    found = run.allocator.search(run.matrices, ratios, run.spectra, run.config.rank_multiple, measure, run.widths)
    measured = measure is not None and any(a.info for a in found.values())
    run.timings["loss_scale_s" if measured else "allocation_s"] = time.perf_counter() - t
    if run.record is not None:
        run.record.save({r: a.to_dict() for r, a in found.items()})
    run.shared.setdefault("allocations", {}).update(found)
    run.allocations = {r: run.shared["allocations"][r] for r in run.ratios}


def _measure(run: Run, windows: torch.Tensor):
    """measure(ranks) -> the model's mean loss on `windows` with the named matrices truncated at those ranks, the
    factors read off the spectra phase's decompositions; computed a decoder layer at a time (a layer-wise model
    too), each layer truncated only while it runs."""
    family = family_of(run.model)

    def factors_of(name: str, rank: int):
        lin = run.model.get_submodule(name)
        dec = run.store.get(name, lin.weight.device) if run.store is not None else None
        if dec is None:  # under torchrun another rank decomposed it: decompose it here too
            i = family.layer_index(name)
            stats = run.dense.load(i) if run.needs_inputs else None
            group = family.group_of[name[len(family.layer_prefix(i)):]]
            dec = decompose(run.method, name, lin, linear_stats(stats, run.grads, name, group))
        return dec.factors(rank, dtype=lin.weight.dtype)

    captured: dict = {}

    def measure(ranks: dict[str, int]) -> float:
        by_layer: dict[int, dict[str, int]] = {}
        for name, rank in ranks.items():
            by_layer.setdefault(family.layer_index(name), {})[name] = rank

        @contextlib.contextmanager
        def truncated(i: int):  # layer i with its named matrices truncated while it runs (it is resident then)
            originals = swap_in(run.model, {name: factors_of(name, r) for name, r in by_layer.get(i, {}).items()})
            try:
                yield
            finally:
                swap_back(run.model, originals)

        if "inputs" not in captured:  # the layer-0 inputs and every layer's arguments: the same for every measurement
            captured["inputs"] = capture_layer_inputs(run.model, windows)
        nll = layerwise_loss(run.model, windows, truncated, captured["inputs"])
        if not math.isfinite(nll):  # a secant or an allocation's loss must not fall back silently
            raise SvdllmError(f"The model's loss on the calibration windows is {nll} while measuring the "
                              "allocation's truncations: the statistics or the weights are damaged. Check the model, "
                              "or run the global allocator without measurements (--alloc-arg calibrate=0).")
        return nll

    return measure


def _factorization(run: Run, writers: dict) -> tuple[LayerFactorizer, bool]:
    """Phase 7: each layer's factors for every ratio, from the cached statistics, from the weights alone, or in a
    calibration pass of their own (the sequential mode; the closed-form update, through the compressed model)."""
    cal, model = run.config.calibration, run.model
    # the closed-form update needs the compressed model's activations, which no cache can hold
    from_cache = run.needs_inputs and not run.closed_form and run.cache is not None and run.cache.has_all(run.num_layers)
    partial = PartialFactors(run.cache.dir, {
        "method": run.config.method, "method_options": run.config.method_options, "update": run.config.update,
        "mode": cal.mode, "ranks": run.ranks[run.ratios[0]], "dtype": str(next(model.parameters()).dtype),
        "version": __version__}) if run.closed_form and run.cache is not None else None
    factorizer = LayerFactorizer(model, run.method, run.ratios, run.ranks, run.grads, run.store,
                                 refit if run.closed_form else None,
                                 cal.mode == "sequential", run.timings, writers, partial)
    t = time.perf_counter()
    if not run.needs_inputs or from_cache:  # no calibration pass: factorize from the cache (or the weights alone)
        if from_cache:
            log.info("Calibration statistics found in the cache (%s): skipping the calibration pass.", run.cache.dir)
        Walk(model, progress=run.progress).run(FromStatistics(factorizer, run.cache.load if from_cache else None))
        return factorizer, from_cache
    resume = run.cache.load_if_present if run.cache is not None and cal.mode == "original" else None

    def keep(i: int, stats) -> None:
        if run.cache is not None and cal.mode == "original" and not run.cache.has(i):
            run.cache.save(i, stats)

    walk = Walk(model, run.windows, cal.batch_size, run.progress)
    if run.closed_form:
        restored = frozenset(i for i in range(run.num_layers) if partial is not None and partial.has(i))
        if restored:
            log.info("Resuming the closed-form pass from the layers an earlier run finished (%s).", partial.dir)
        walk.run(ClosedFormPass(factorizer.layer, factorizer.restore, keep, DRIFT_GROUPS[run.config.update], resume,
                                restored, dense_cached=resume is not None and run.cache.has_all(run.num_layers)))
    else:
        def factorize(i: int, layer, stats) -> None:
            factorizer.layer(i, layer, stats)
            keep(i, stats)

        walk.run(InputStatistics(cached=resume, sequential=cal.mode == "sequential", use=factorize))
    run.timings["calibration_s"] += time.perf_counter() - t - run.timings["factorization_s"]
    return factorizer, from_cache


def _save(run: Run, factorizer: LayerFactorizer, writers: dict, params_before: int,
          from_cache: bool) -> list[CompressionResult]:
    """Phase 8: each ratio's model swapped in, checked and saved with its manifest (then swapped out again when the
    run has several ratios)."""
    model, config, cal = run.model, run.config, run.config.calibration
    results = []
    probe = run.windows[:1, : min(128, cal.seqlen)] if run.windows is not None else torch.tensor([[1, 2, 3, 4]])
    # (the probe only checks that the compressed model's logits are finite before anything is saved)
    shapes = {m.name: [m.out_features, m.in_features] for m in run.matrices}
    for r in run.ratios:
        counts = param_counts(run.matrices, run.ranks[r])
        if run.lazy:  # the layers were written one by one; the model here is a shell
            originals = {}
            counts.update(model_before=params_before,
                          model_after=params_before - counts["linear_dense"] + counts["linear_kept"])
        else:
            originals = factorizer.applied if factorizer.sequential else swap_in(model, factorizer.factors[r])
            counts.update(model_before=params_before, model_after=count_params(model))
            check_finite_outputs(model, probe)
        allocation = run.allocations[r]
        quantization = _quantize(run, allocation, originals) if allocation.bits is not None else None
        name = getattr(model.config, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        manifest = Manifest(
            svdllm_version=__version__, base_model=name, source_model=source_metadata(name),
            model_type=model.config.model_type, dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            preset=config.preset, method=config.method, method_options=dict(config.method_options), ratio=r,
            alloc=config.alloc, alloc_options=_alloc_options(run.allocator), allocation=_allocation_record(allocation),
            rank_multiple=config.rank_multiple, update=config.update,
            calibration=_calibration_record(cal, run.needs_inputs or run.needs_grads, from_cache),
            gram_dtype=(config.gram_dtype or "float64") if run.needs_grams else None, params=counts, timings=run.timings, ranks=run.ranks[r], shapes=shapes,
            truncation_loss=factorizer.losses[r], whitening_jitter=factorizer.jitters,
            update_error_reduction=factorizer.update_gain, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            environment=environment(), widths=run.widths.record() if run.widths else None,
            ratio_of="float32 bytes" if run.widths else "parameters",
            family=family_of(model).record() if family_of(model).custom else None).to_dict()
        if quantization is not None:
            manifest.update(quantization=quantization, dtype="float32")
        result = CompressionResult(r, run.ranks[r], counts, factorizer.losses[r], dict(run.timings), run.outs[r],
                                   manifest, originals)
        if run.lazy:
            tied = getattr(model.config, "tie_word_embeddings", False)
            rest = {k: v for k, v in model.state_dict().items()
                    if family_of(model).layer_index(k) is None and not (tied and k == "lm_head.weight")}
            writers[r].finish(model, run.tokenizer, manifest, rest)
        elif run.outs[r] is not None and distributed.is_main():  # written once, by rank 0
            save(model, run.tokenizer, run.outs[r], manifest, run.overwrite)
        if len(run.ratios) > 1:
            swap_back(model, originals)
        results.append(result)
        log.info("ratio %.2f: %d → %d parameters (%.1f%% of the compressed linears removed)", r, params_before,
                 counts["model_after"], 100 * counts["achieved_ratio"])
    if factorizer.partial is not None:  # the models are saved: nothing left to resume
        factorizer.partial.clear()
    distributed.barrier()  # no rank returns before rank 0 has written the models
    return results


def _quantize(run: Run, allocation: Allocation, originals: dict) -> dict:
    """Phase 8a, with --bits: the model quantized as the joint allocation chose, each matrix by GPTQ at its width
    (float where it chose none), on the calibration windows, before the one save. A matrix kept dense and quantized
    is quantized in a copy, its original put in `originals`: with several ratios the model goes back dense."""
    from .quantization import quantize_and_report

    for name, bits in allocation.bits.items():
        if bits is not None and allocation.ranks[name] is None:
            originals[name] = run.model.get_submodule(name)
            set_submodule(run.model, name, copy.deepcopy(originals[name]))
    cal = run.config.calibration
    record = {"dataset": cal.dataset if isinstance(cal.dataset, str) else "given windows", "nsamples": cal.nsamples,
              "seqlen": cal.seqlen, "seed": cal.seed}
    info = quantize_and_report(run.model, "mixed", run.widths.group_size, "gptq", run.windows, record, run.progress,
                               bits_of=allocation.bits)
    run.timings["quantize_s"] = info["quantize_s"]
    log.info("quantized as allocated (%s), %.2f bits per quantized weight, %.1f MiB of decoder linears.",
             ", ".join(f"{sum((b or 0) == w for b in info['bits'].values())} × {w or 'float'}"
                       for w in sorted({b or 0 for b in info["bits"].values()})),
             info["bits_per_weight"], info["linear_bytes"] / 2**20)
    return info


def _allocation_record(allocation: Allocation) -> dict:
    """What the manifest records of an allocation: the allocator's report and, from a joint one, the widths chosen
    and the bytes planned."""
    if allocation.bits is None:
        return allocation.info
    return {**allocation.info, "bits": allocation.bits, "linear_bytes_planned": allocation.linear_bytes}


def _alloc_options(allocator: Allocator) -> dict:
    """Every option's value, defaults included."""
    return {k: getattr(allocator, k) for k in sorted(allocator.options())}


def summarize(results: list[CompressionResult]) -> list[dict]:
    return [{"ratio": r.ratio, "out": str(r.out) if r.out else None, **r.params, **r.timings,
             "mean_truncation_loss": (sum(r.truncation_loss.values()) / max(len(r.truncation_loss), 1))
             if r.truncation_loss else math.nan, **_quantized(r.manifest)} for r in results]


def _quantized(manifest: dict) -> dict:
    """What --bits made of a result: its bytes and the count of matrices at each width."""
    q = manifest.get("quantization")
    if not q:
        return {}
    widths = [str(b) if b else "float" for b in q["bits"].values()]
    return {"linear_bytes": q["linear_bytes"], "bits_per_weight": q["bits_per_weight"],
            "widths": {w: widths.count(w) for w in sorted(set(widths))}}
