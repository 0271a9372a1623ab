"""The orchestrator: calibration → factorization (a method) → allocation (ranks) → update → save.

`compress(model, tokenizer, config)` swaps the compressible linears of `model` for LowRankLinear modules in
place, like torchao's quantize_ or peft's get_peft_model. With several ratios, one calibration pass and one
decomposition of each matrix serve all of them: each ratio's model is written to its own directory and the
model is handed back dense.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .allocation import MatrixInfo, Spectrum, get_allocator, param_counts
from .calibration import distributed
from .calibration import (AllocationRecord, LinearStats, PartialFactors, StatsCache, calibrate_layers, gradient_stats,
                          model_fingerprint)
from .config import CompressConfig, available_memory
from .data import CORPORA, calibration_set, check_token_ids
from .data.texts import split_sources
from .errors import SvdllmError
from .factorization import get_method
from .modules import LowRankLinear
from .io.checkpoint import LayerwiseWriter, abort_open_writers, check_out_dir, save
from .models.lazy import is_lazy, release, resident, resident_bytes
from .models.families import LINEAR_NAMES, family_of, layer_index, layer_prefix, set_submodule
from .models.loading import cache_root, source_metadata
from .update import DRIFT_GROUPS, UPDATES, base_update, closed_form_w_u

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
        for name in LINEAR_NAMES:
            lin = layer.get_submodule(name)
            out.append(MatrixInfo(family.linear_name(i, name), lin.out_features, lin.in_features))
    return out


def environment() -> dict:
    """The versions and thread count a model was made with: float32 forward passes differ in their last bits
    between library versions, and the global allocator's measured secants carry such differences into the ranks."""
    import platform

    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def output_gram_bytes(model) -> int:
    """Memory of kfac-svd's output-gradient Grams: one m × m float64 matrix per compressed linear."""
    return sum(8 * m.out_features ** 2 for m in matrices_of(model))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once


def swap_in(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, nn.Module]:
    """Replace each named linear by LowRankLinear(W_u, W_v); returns the replaced modules for `swap_back`."""
    originals = {}
    for name, (w_u, w_v) in factors.items():
        dense = model.get_submodule(name)
        bias = dense.bias.detach() if dense.bias is not None else None
        set_submodule(model, name, LowRankLinear.from_factors(w_u, w_v, bias))
        originals[name] = dense
    return originals


def swap_back(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    for name, module in originals.items():
        set_submodule(model, name, module)


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
           "dataset": cal.dataset, "nsamples": cal.nsamples, "seqlen": cal.seqlen, "seed": cal.seed}
    if root is None:
        root = Path(config.cache_dir) if config.cache_dir else cache_root()
    return StatsCache(root, key)


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
    config.validate()
    family_of(model)
    ratios = [float(r) for r in config.ratios]
    if len(ratios) > 1 and out is None:
        raise SvdllmError("Several ratios need an output directory (--out): each ratio's model is saved there.")
    plan = config.resolve(output_gram_bytes(model), available_memory(), is_lazy(model))
    if plan.reason:
        log.warning("--preset best: %s, so this run uses --method %s --alloc %s.", plan.reason, plan.method,
                    plan.alloc)
    for update in plan.updates.values():
        if update not in UPDATES:
            raise SvdllmError(f"Unknown update {update!r}; available: {', '.join(UPDATES)}.")
    get_method(plan.method, **config.method_options)
    get_allocator(plan.alloc, **config.alloc_options)
    outs = {r: None if out is None else Path(out) if len(ratios) == 1 else Path(out) / f"ratio-{r:g}" for r in ratios}
    for o in outs.values():
        if o is not None:
            check_out_dir(o, overwrite)
    groups = plan.groups()
    if len(groups) > 1:
        log.info("Updates per ratio: %s (the ratios without one share a calibration pass).",
                 ", ".join(f"R = {r:g}: {u}" for r, u in plan.updates.items()))
    shared = {"ratios": ratios}  # every ratio's ranks, allocated once for the whole run (spectral allocators)
    results = []
    for update, rs in groups:
        concrete = dataclasses.replace(config, method=plan.method, alloc=plan.alloc, update=update,
                                       ratio=rs if len(rs) > 1 else rs[0])
        got = _compress_concrete(model, tokenizer, concrete, {r: outs[r] for r in rs}, overwrite, progress, shared)
        if len(ratios) > 1 and len(rs) == 1:  # a group of one leaves its model in place; the run leaves it dense
            swap_back(model, got[0].originals)
        results += got
    order = {r: k for k, r in enumerate(ratios)}
    return sorted(results, key=lambda res: order[res.ratio])


def _compress_concrete(model, tokenizer, config: CompressConfig, outs: dict, overwrite: bool, progress: bool,
                       shared: dict) -> list[CompressionResult]:
    """One method, allocator and update (all named) for the ratios of `outs`."""
    method = get_method(config.method, **config.method_options)
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
    try:
        return _compress(model, tokenizer, config, method, ratios, outs, overwrite, progress, shared)
    except BaseException:
        abort_open_writers()  # a layer-wise save leaves no partial directory behind
        raise


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


def _compress(model, tokenizer, config, method, ratios, outs, overwrite, progress, shared):
    cal = config.calibration
    matrices = matrices_of(model)
    shapes = {m.name: m for m in matrices}
    allocator = get_allocator(config.alloc, **config.alloc_options)
    alloc_options = {k: getattr(allocator, k) for k in sorted(allocator.options())}  # defaults included
    spectral = "spectrum" in allocator.needs  # ranks come from the decompositions, so those come first
    params_before = count_params(model)
    closed_form = config.update in DRIFT_GROUPS
    needs_inputs = "inputs" in method.needs or closed_form or "inputs" in allocator.needs
    needs_grams = "output_grams" in method.needs
    needs_grads = "fisher" in method.needs or "gradients" in allocator.needs or needs_grams
    needs_data = needs_inputs or needs_grads
    timings = {"calibration_s": 0.0, "factorization_s": 0.0}
    lazy = is_lazy(model)
    writers = {}
    if lazy:
        if needs_grads:
            raise SvdllmError(f"--layerwise cannot run the gradient pass that {config.method} / {config.alloc} need "
                              "(it back-propagates through the whole model); use svd-llm, svd-llm-v2, asvd, dipsvd "
                              "or svd with uniform, v2 or lorap allocation, or load the model whole.")
        if any(o is None for o in outs.values()):
            raise SvdllmError("--layerwise writes each layer as it is compressed: give an output directory.")
        writers = {r: LayerwiseWriter(outs[r], overwrite) for r in ratios}
        timings["peak_resident_weight_mb"] = resident_bytes(model) / 2**20

    windows, cache, scratch = None, None, None
    if needs_data:
        windows = calibration_set(tokenizer, cal.dataset, cal.nsamples, cal.seqlen, cal.seed, cal.data_dir)
        if getattr(tokenizer, "chat_template", None) and all(s in CORPORA for s in split_sources(cal.dataset)):
            log.warning("This model has a chat template, and the calibration text (%s) has no conversations: "
                        "compressed on plain text alone, an instruct model tends to end its turn at once (SmolLM2, "
                        "--preset best at R = 0.4: 70%% of replies empty). --calib-dataset %s,alpaca keeps it "
                        "answering (BENCHMARKS.md, 'Instruct models').", cal.dataset, cal.dataset)
        check_token_ids(windows, model)
        cache = _stats_cache(model, config, windows)
    num_layers = len(family_of(model).decoder_layers(model))

    t0 = time.perf_counter()
    grads = None
    if needs_grads:
        n_grad = min(cal.grad_samples or cal.nsamples, cal.nsamples)
        grads = cache.load_gradients(n_grad, needs_grams) if cache is not None else None
        if grads is None:
            grads = gradient_stats(model, windows[:n_grad], progress, output_grams=needs_grams)
            if cache is not None:
                cache.save_gradients(grads)
                if needs_grams:  # from here on, read each Gram from disk when its layer comes
                    grads = cache.load_gradients(n_grad, needs_grams)
        timings["gradient_pass_s"] = time.perf_counter() - t0
        # ru_maxrss only grows: read after each phase, it tells which phase set the process's peak
        timings["peak_rss_after_gradients_mb"] = peak_rss_mb()

    def stats_for(full: str, name: str, stats) -> LinearStats:
        linear_stats = stats.for_linear(name) if stats is not None else LinearStats()
        if grads is not None:
            linear_stats.fisher_rows = grads.rows[full]
            if grads.output_grams is not None:
                linear_stats.output_gram = grads.output_grams[full]
        return linear_stats

    def decompose(full: str, lin: nn.Module, linear_stats: LinearStats):
        if not torch.isfinite(lin.weight).all():
            raise SvdllmError(f"The weight of {full} contains NaN or inf: the checkpoint is damaged.")
        try:
            return method.decompose(lin.weight.detach().to(torch.float64), linear_stats)
        except ValueError as e:
            raise SvdllmError(f"Factorizing {full} failed: {e}") from e

    if spectral:
        # Phase 1: decompose every matrix on the dense model's statistics and keep only its spectrum; allocate;
        # phase 2 below decomposes again at the allocated ranks. Holding every decomposition instead would cost
        # about twice the model's size; recomputing costs one more round of SVDs.
        t = time.perf_counter()
        if needs_inputs:
            spectra_cache = None
            if config.cache_dir != "":  # the dense model's statistics, whatever the mode: cacheable
                root = Path(config.cache_dir) if config.cache_dir else cache_root()
                spectra_cache = _stats_cache(model, config, windows, root=root)
            else:  # statistics cache off or sequential mode: a scratch cache for this run
                import tempfile

                scratch = tempfile.TemporaryDirectory(prefix="svdllm-stats-")
                spectra_cache = _stats_cache(model, config, windows, root=Path(scratch.name))
        # the allocation depends on the statistics and on what is decided here, not on the update: kept beside the
        # statistics, it serves the same configuration with another update, and an interrupted run
        alloc_file = AllocationRecord(spectra_cache, {
            "method": config.method, "method_options": config.method_options, "alloc": config.alloc,
            # every option's value, defaults included, so that a changed default is not served an old allocation
            "alloc_options": alloc_options, "rank_multiple": config.rank_multiple,
            "grad_samples": cal.grad_samples, "dtype": str(next(model.parameters()).dtype), "version": __version__,
        }) if needs_inputs and config.cache_dir != "" else None
        # one spectra phase allocates every ratio of the run (several updates run in turn); each ratio's ranks depend
        # on that ratio alone, so a record made with other ratios beside it serves it too
        alloc_ratios = [r for r in shared.get("ratios", ratios) if r not in shared.get("rank_maps", {})] or ratios
        known = None
        if all(r in shared.get("rank_maps", {}) for r in ratios):
            known = shared["rank_maps"], shared["alloc_info"]
        elif alloc_file is not None:
            known = alloc_file.load(ratios)
        # the dense statistics serve the spectra and, without an update, the factorization; the closed-form update
        # gathers its own in its pass through the compressed model
        if needs_inputs and (known is None or not _ratio_dependent(config)) and not spectra_cache.has_all(num_layers):
            for i, stats in calibrate_layers(model, windows, cal.batch_size, progress=progress,
                                             cached=spectra_cache.load_if_present):  # resumes from any layers left
                if not spectra_cache.has(i):
                    spectra_cache.save(i, stats)
        timings["calibration_s"] += time.perf_counter() - t
        spectra = None
        if known is None:
            t = time.perf_counter()
            spectra = {}
            layers = family_of(model).decoder_layers(model)
            for i, layer in enumerate(tqdm(layers, desc="spectra", unit="layer", disable=not progress)):
                stats = spectra_cache.load(i) if needs_inputs else None
                with resident(model, i):
                    for k, name in enumerate(LINEAR_NAMES):
                        if not distributed.mine(i * len(LINEAR_NAMES) + k):  # round-robin across ranks (torchrun)
                            continue
                        full = layer_prefix(i) + name
                        lin = layer.get_submodule(name)
                        linear_stats = stats_for(full, name, stats)
                        spectra[full] = _spectrum(lin.weight, decompose(full, lin, linear_stats), linear_stats, grads,
                                                  full)
            spectra = distributed.gather_merge(spectra)
            timings["spectra_s"] = time.perf_counter() - t
            timings["peak_rss_after_spectra_mb"] = peak_rss_mb()
        if needs_inputs and not _ratio_dependent(config):
            cache = spectra_cache  # phase 2 reads the statistics back instead of running the pass again
    else:
        spectra, alloc_file, known = None, None, None
    if known is not None:
        rank_maps, alloc_info = known
        if "rank_maps" not in shared or any(r not in shared["rank_maps"] for r in ratios):
            log.info("Ranks from an earlier run's allocation (%s): the spectra are not recomputed.", alloc_file.path)
    elif spectra is not None:
        n_check = int(getattr(allocator, "calibrate", 0) or 0)
        if n_check and any(sp.loss is not None for sp in spectra.values()):
            t = time.perf_counter()
            stats_of = (lambda i: spectra_cache.load(i)) if needs_inputs else (lambda i: None)
            rank_maps, alloc_info = _refined_allocation(
                model, matrices, spectra, stats_of, stats_for, decompose, windows[:n_check], alloc_ratios, allocator,
                config.rank_multiple, int(getattr(allocator, "refine", 0) or 0))
            timings["loss_scale_s"] = time.perf_counter() - t
        else:
            t = time.perf_counter()
            rank_maps = {r: allocator.allocate(matrices, r, spectra, config.rank_multiple) for r in alloc_ratios}
            alloc_info = {r: {} for r in alloc_ratios}
            timings["allocation_s"] = time.perf_counter() - t
        if alloc_file is not None:
            alloc_file.save(rank_maps, alloc_info)
        shared.setdefault("rank_maps", {}).update(rank_maps)
        shared.setdefault("alloc_info", {}).update(alloc_info)
    else:
        t = time.perf_counter()
        rank_maps = {r: allocator.allocate(matrices, r, None, config.rank_multiple) for r in ratios}
        alloc_info = {r: {} for r in ratios}
        timings["allocation_s"] = time.perf_counter() - t

    # the closed-form update needs the compressed model's activations, which no cache can hold
    use_cache = needs_inputs and not closed_form and cache is not None and cache.has_all(num_layers)
    partial = PartialFactors(cache, {"method": config.method, "method_options": config.method_options,
                                     "update": config.update, "mode": cal.mode, "ranks": rank_maps[ratios[0]],
                                     "dtype": str(next(model.parameters()).dtype), "version": __version__},
                             ) if closed_form and cache is not None else None

    factors = {r: {} for r in ratios}
    losses = {r: {} for r in ratios}
    jitters: dict[str, float] = {}
    sequential = cal.mode == "sequential" or closed_form  # each layer is swapped in as soon as it is done
    applied: dict[str, nn.Module] = {}
    update_gain: dict[str, float] = {}

    def factorize_one(full: str, name: str, lin: nn.Module, stats) -> dict:
        """Every ratio's factors of one matrix, and what the manifest records about it."""
        linear_stats = stats_for(full, name, stats)
        whiten_stats = linear_stats
        if closed_form and cal.mode == "sequential":  # whiten on the compressed model's own inputs
            whiten_stats = dataclasses.replace(linear_stats, gram=linear_stats.gram_compressed)
        dec = decompose(full, lin, whiten_stats)
        out = {"jitter": dec.info.get("whitening_jitter"), "factors": {}, "losses": {}, "gain": None}
        for r in ratios:
            rank = rank_maps[r][full]
            if rank is None:
                continue
            w_u, w_v = dec.factors(rank, dtype=torch.float64)
            if closed_form:
                w = lin.weight.detach().to(torch.float64)
                before = _output_error(w, w_u, w_v, linear_stats)
                w_u = closed_form_w_u(w, w_v, linear_stats.gram_compressed, linear_stats.cross)
                # relative reduction of the squared output error on the calibration data
                out["gain"] = 1.0 - _output_error(w, w_u, w_v, linear_stats) / max(before, 1e-300)
            out["factors"][r] = (w_u.to(lin.weight.dtype).contiguous(), w_v.to(lin.weight.dtype).contiguous())
            out["losses"][r] = dec.truncation_loss(rank)
        return out

    def process_layer(i: int, layer: nn.Module, stats, names=LINEAR_NAMES) -> bool:
        """Factorize `names` of layer i (with the closed-form update, one input group at a time)."""
        t = time.perf_counter()
        # under torchrun each rank factorizes every world_size-th matrix; the results are gathered on all ranks
        done = distributed.gather_merge({
            layer_prefix(i) + name: factorize_one(layer_prefix(i) + name, name, layer.get_submodule(name), stats)
            for k, name in enumerate(LINEAR_NAMES) if name in names and distributed.mine(i * len(LINEAR_NAMES) + k)})
        for full in (layer_prefix(i) + name for name in names):
            one = done[full]
            if one["jitter"]:
                jitters[full] = one["jitter"]
            if one["gain"] is not None:
                update_gain[full] = one["gain"]
            for r, pair in one["factors"].items():
                factors[r][full] = pair
                losses[r][full] = one["losses"][r]
        timings["factorization_s"] += time.perf_counter() - t
        prefix = layer_prefix(i)
        if sequential:
            applied.update(swap_in(model, {f"{prefix}{n}": factors[ratios[0]][f"{prefix}{n}"] for n in names
                                           if f"{prefix}{n}" in factors[ratios[0]]}))
        if names[-1] != LINEAR_NAMES[-1]:  # the closed-form update: more groups of this layer to come
            return sequential
        if partial is not None:  # the layer is finished: an interrupted pass resumes after it
            done_here = {k: v for k, v in factors[ratios[0]].items() if k.startswith(prefix)}
            partial.save(i, done_here, {"loss": {k: losses[ratios[0]][k] for k in done_here},
                                        "gain": {k: update_gain[k] for k in done_here if k in update_gain},
                                        "jitter": {k: jitters[k] for k in done_here if k in jitters}})
        write_layer(i, layer)
        return sequential

    def write_layer(i: int, layer: nn.Module) -> None:
        prefix = layer_prefix(i)
        if lazy:  # written now, so the compressed model is never whole in memory
            for r in ratios:
                writers[r].add(f"model-layer-{i:05d}.safetensors", _layer_tensors(layer, prefix, factors[r]))
            timings["peak_resident_weight_mb"] = max(timings["peak_resident_weight_mb"], resident_bytes(model) / 2**20)
            for r in ratios:
                for k in [k for k in factors[r] if k.startswith(prefix)]:
                    del factors[r][k]

    def restore_layer(i: int, layer: nn.Module) -> bool:
        """Layer i's factors from an interrupted closed-form pass, swapped in as if just computed."""
        got = partial.load(i)
        if got is None:
            return False
        pairs, info = got
        for full, pair in pairs.items():
            factors[ratios[0]][full] = pair
            losses[ratios[0]][full] = info["loss"][full]
        update_gain.update(info["gain"])
        jitters.update(info["jitter"])
        applied.update(swap_in(model, pairs))
        write_layer(i, layer)
        return True

    t = time.perf_counter()
    if not needs_inputs or use_cache:  # no calibration pass: factorize from the cache (or from the weights alone)
        if use_cache:
            log.info("Calibration statistics found in the cache (%s): skipping the calibration pass.", cache.dir)
        layers = family_of(model).decoder_layers(model)
        for i, layer in enumerate(tqdm(layers, desc="factorization", unit="layer", disable=not progress)):
            with resident(model, i):
                process_layer(i, layer, cache.load(i) if use_cache else None)
    else:
        resume = cache.load_if_present if cache is not None and cal.mode == "original" else None
        if partial is not None and partial.has(0):
            log.info("Resuming the closed-form pass from the layers an earlier run finished (%s).", partial.dir)
        release_layer = (lambda i, layer: release(model, layer_prefix(i))) if lazy else None  # noqa: E731
        for i, stats in calibrate_layers(model, windows, cal.batch_size, on_layer=process_layer, progress=progress,
                                         paired=closed_form, drift_groups=DRIFT_GROUPS.get(config.update, ()),
                                         cached=resume, on_exit=release_layer,
                                         restore=restore_layer if partial is not None else None,
                                         dense_cached=resume is not None and cache.has_all(num_layers)):
            if cache is not None and cal.mode == "original" and not cache.has(i):
                cache.save(i, stats)
        timings["calibration_s"] += time.perf_counter() - t - timings["factorization_s"]
    if scratch is not None:
        scratch.cleanup()
    timings["total_s"] = time.perf_counter() - t0
    timings["peak_rss_mb"] = peak_rss_mb()

    if jitters:
        log.warning("%d Gram matrices were not positive definite and needed a jitter (largest %.3g, at %s).",
                    len(jitters), max(jitters.values()), max(jitters, key=jitters.get))

    results = []
    probe = windows[:1, : min(128, cal.seqlen)] if windows is not None else torch.tensor([[1, 2, 3, 4]])
    # (the probe only checks that the compressed model's logits are finite before anything is saved)
    for r in ratios:
        counts = param_counts(matrices, rank_maps[r])
        if lazy:  # the layers were written one by one; the model here is a shell
            originals = {}
            counts.update(model_before=params_before,
                          model_after=params_before - counts["linear_dense"] + counts["linear_kept"])
        else:
            originals = applied if sequential else swap_in(model, factors[r])
            counts.update(model_before=params_before, model_after=count_params(model))
            check_finite_outputs(model, probe)
        manifest = {
            "svdllm_version": __version__,
            "base_model": getattr(model.config, "name_or_path", None) or getattr(model.config, "_name_or_path", None),
            "source_model": source_metadata(getattr(model.config, "name_or_path", None)
                                      or getattr(model.config, "_name_or_path", None)),
            "model_type": model.config.model_type,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "preset": config.preset,
            "method": config.method,
            "method_options": dict(config.method_options),
            "ratio": r,
            "alloc": config.alloc,
            "alloc_options": alloc_options,
            "allocation": alloc_info.get(r, {}),
            "rank_multiple": config.rank_multiple,
            "update": config.update,
            "calibration": dict(cal.__dict__, used=needs_data, from_cache=use_cache),
            "params": counts,
            "timings": timings,
            "ranks": rank_maps[r],
            "shapes": {k: [v.out_features, v.in_features] for k, v in shapes.items()},
            "truncation_loss": losses[r],
            "whitening_jitter": jitters,
            "update_error_reduction": update_gain,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": environment(),
        }
        result = CompressionResult(r, rank_maps[r], counts, losses[r], dict(timings), outs[r], manifest, originals)
        if lazy:
            tied = getattr(model.config, "tie_word_embeddings", False)
            rest = {k: v for k, v in model.state_dict().items()
                    if layer_index(k) is None and not (tied and k == "lm_head.weight")}
            writers[r].finish(model, tokenizer, manifest, rest)
        elif outs[r] is not None and distributed.is_main():  # written once, by rank 0
            save(model, tokenizer, outs[r], manifest, overwrite)
        if len(ratios) > 1:
            swap_back(model, originals)
        results.append(result)
        log.info("ratio %.2f: %d → %d parameters (%.1f%% of the compressed linears removed)", r, params_before,
                 counts["model_after"], 100 * counts["achieved_ratio"])
    if partial is not None:  # the models are saved: nothing left to resume
        partial.clear()
    distributed.barrier()  # no rank returns before rank 0 has written the models
    return results


def _spectrum(weight: torch.Tensor, dec, stats: LinearStats, grads, name: str) -> Spectrum:
    """What allocators may read off one decomposition W = Σ_k u_k s_k ṽ_kᵀ (u_k, ṽ_k the un-whitened factors).

    With gradients and inputs, the predicted loss increase of dropping component k is s_k²·(ṽ_kᵀ XᵀX ṽ_k)·(u_kᵀ G u_k):
    the KFAC estimate ½·tr(G·ΔW·XᵀX·ΔWᵀ) of the loss, split over components (up to the constant ½). For the
    truncation-aware methods the ṽ_k are XᵀX-orthonormal, so the split is exact and the middle factor is 1."""
    s = dec.s.detach().to(torch.float64).cpu()
    loss = grad_norm = None
    if grads is not None:
        grad_norm = math.sqrt(float(grads.rows[name].sum()) / max(grads.windows, 1))
        if dec.info.get("kfac_loss"):  # two-sided whitening: s_k² already is the component's KFAC loss, full G
            loss = s.pow(2)
        elif stats.gram is not None:
            right, left = dec.right.to(torch.float64), dec.left.to(torch.float64)
            in_energy = ((right @ stats.gram.to(torch.float64)) * right).sum(1)
            out_weight = (left.pow(2) * grads.outputs[name].to(torch.float64)[:, None]).sum(0)
            loss = (s.pow(2) * in_energy.cpu() * out_weight.cpu()).clamp_min(0)
    return Spectrum(s, loss, grad_norm, float(weight.detach().double().norm()))


@torch.no_grad()
def _mean_nll(model, windows: torch.Tensor) -> float:
    device = next(model.parameters()).device
    nll = sum(float(model(input_ids=w[None].to(device), labels=w[None].to(device), use_cache=False).loss)
              for w in windows) / len(windows)
    if not math.isfinite(nll):  # a secant or an allocation's loss must not fall back silently
        raise SvdllmError(f"The model's loss on the calibration windows is {nll} while measuring the allocation's "
                          "truncations: the statistics or the weights are damaged. Check the model, or run the "
                          "global allocator without measurements (--alloc-arg calibrate=0).")
    return nll


def _truncated_factors(model, matrices, stats_of, stats_for, decompose, ranks: dict) -> dict:
    """(ratio, kind) -> name -> (W_u, W_v): every matrix truncated at ranks[ratio][name] (None: left dense)."""
    factors: dict[tuple, dict] = {}
    by_layer: dict[int, list[MatrixInfo]] = {}
    for m in matrices:
        by_layer.setdefault(m.layer, []).append(m)
    for i, group in by_layer.items():
        stats = stats_of(i)
        for m in group:
            if all(ranks[r][m.name] is None for r in ranks):
                continue
            lin = model.get_submodule(m.name)
            dec = decompose(m.name, lin, stats_for(m.name, m.name.split(".", 3)[3], stats))
            for r in ranks:
                if ranks[r][m.name] is not None:
                    factors.setdefault((r, m.kind), {})[m.name] = dec.factors(ranks[r][m.name], dtype=lin.weight.dtype)
    return factors


def _measured_losses(model, matrices, spectra, factors, ranks, windows, base: float, types: bool, joint: bool) -> dict:
    """Per ratio: each matrix type's measured loss increase when that type alone is truncated at `ranks` and the
    KFAC prediction for it (sum of the discarded components' losses), and with `joint` the increase when every
    matrix is truncated at once."""
    out = {}
    for r in ranks:
        by_type = {}
        for kind in sorted({m.kind for m in matrices}) if types else []:
            predicted = sum(float(spectra[m.name].loss[ranks[r][m.name]:].sum()) for m in matrices
                            if m.kind == kind and ranks[r][m.name] is not None)
            if (r, kind) not in factors or predicted <= 0:
                continue
            originals = swap_in(model, factors[r, kind])
            try:
                by_type[kind] = {"measured": _mean_nll(model, windows) - base, "predicted": predicted}
            finally:
                swap_back(model, originals)
        out[r] = {"types": by_type}
        if joint:
            originals = swap_in(model, {n: f for (ratio, _), d in factors.items() if ratio == r for n, f in d.items()})
            try:
                out[r]["joint"] = _mean_nll(model, windows) - base
            finally:
                swap_back(model, originals)
    return out


def _type_scales(types: dict, kinds) -> dict[str, float]:
    """measured / predicted per type, normalised to a geometric mean of 1 (only the relative scale between types
    matters to the allocation); a type whose measured change is at or below zero (noise on few windows), or that
    was not truncated, keeps its prediction as it is."""
    scales = {k: (types[k]["measured"] / types[k]["predicted"] if k in types and types[k]["measured"] > 0 else 1.0)
              for k in kinds}
    g = math.exp(sum(math.log(v) for v in scales.values()) / len(scales))
    return {k: v / g for k, v in scales.items()}


def _refined_allocation(model, matrices, spectra, stats_of, stats_for, decompose, windows, ratios, allocator,
                        multiple: int, refine: int) -> tuple[dict, dict]:
    """Global allocation with the KFAC predictions rescaled per matrix type by measured truncations.

    The quadratic (KFAC) model is a tangent: exact for small errors, but at high compression the nonlinearities
    after some projections (softmax after q/k, the SiLU gate) make it under- or over-state the damage, and by
    matrix type. A secant per type corrects it: the model's measured loss increase when every matrix of the type is
    truncated, over the prediction for the same truncation. Round 0 measures it at the uniform ranks. The
    allocation then moves far from uniform (q_proj cut to a tenth, v_proj kept almost whole), where the secant may
    differ: each of `refine` further rounds measures it again at the previous allocation's own ranks and allocates
    anew; every allocation's loss increase with all its matrices truncated at once is measured too, and the one
    with the lowest is kept. Cost per round: one decomposition of every matrix and (types + 1) forward passes over
    `windows` per ratio, and one more of each at the end."""
    from .allocation import ALLOCATORS

    kinds = sorted({m.kind for m in matrices})
    base = _mean_nll(model, windows)
    at = {r: ALLOCATORS["uniform"]().allocate(matrices, r) for r in ratios}
    rounds: dict[str, list] = {str(r): [] for r in ratios}
    best: dict[float, tuple] = {}
    for k in range(refine + 2):
        last = k == refine + 1  # the last allocation's own loss only
        if last and refine == 0:  # one allocation, from the secant at the uniform ranks, not measured
            best = {r: (None, 0, at[r]) for r in ratios}
            break
        factors = _truncated_factors(model, matrices, stats_of, stats_for, decompose, at)
        measured = _measured_losses(model, matrices, spectra, factors, at, windows, base, types=not last, joint=k > 0)
        del factors
        for r in ratios:
            if k > 0:  # `at` is the allocation round k - 1's scales made: keep the best by its measured loss
                rounds[str(r)][-1]["allocation_loss"] = measured[r]["joint"]
                if measured[r]["joint"] < best.get(r, (math.inf,))[0]:
                    best[r] = (measured[r]["joint"], k - 1, at[r])
            if last:
                continue
            scale = _type_scales(measured[r]["types"], kinds)
            rounds[str(r)].append({"measured_at": "uniform ranks" if k == 0 else f"round {k - 1}'s allocation",
                                   "types": measured[r]["types"], "scales": scale})
            log.info("ratio %.2f, round %d: measured/predicted loss per matrix type: %s", r, k,
                     ", ".join(f"{t} {v:.3g}" for t, v in scale.items()))
            scaled = _rescaled(spectra, matrices, scale)
            at[r] = allocator.allocate(matrices, r, scaled, multiple)
            rounds[str(r)][-1]["allocation_predicted"] = sum(
                float(scaled[m.name].loss[at[r][m.name]:].sum()) for m in matrices if at[r][m.name] is not None)
    info = {r: {"loss_scales": rounds[str(r)][best[r][1]]["scales"] if rounds[str(r)] else None, "base_loss": base,
                "chosen_round": best[r][1], "rounds": rounds[str(r)]} for r in ratios}
    return {r: best[r][2] for r in ratios}, info


def _rescaled(spectra: dict, matrices, scale: dict) -> dict:
    kind = {m.name: m.kind for m in matrices}
    return {name: dataclasses.replace(sp, loss=sp.loss * scale[kind[name]]) for name, sp in spectra.items()}


def _layer_tensors(layer: nn.Module, prefix: str, factors: dict) -> dict[str, torch.Tensor]:
    """Decoder layer's tensors as the saved model names them: each factorized linear as its u/v factors."""
    out = {}
    for name, t in layer.state_dict().items():
        # the linear may still be dense or already swapped for ratio[0]'s LowRankLinear (closed-form update)
        linear = next((n for n in LINEAR_NAMES if name.startswith(n + ".")), None)
        pair = factors.get(prefix + linear) if linear else None
        if pair is None:
            out[prefix + name] = t
            continue
        out[f"{prefix}{linear}.u.weight"], out[f"{prefix}{linear}.v.weight"] = pair
        if name.endswith("bias"):  # a linear's bias goes with W_u
            out[f"{prefix}{linear}.u.bias"] = t
    for k, v in out.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise SvdllmError(f"{k} contains NaN or inf after factorization; nothing was written.")
    return out


def _output_error(w, w_u, w_v, stats) -> float:
    """‖W·X − W_u·W_v·X′‖_F² from the moments, without the activations:
    tr(W XᵀX Wᵀ) − 2 tr(W XᵀX′ (W_u W_v)ᵀ) + tr(W_u W_v X′ᵀX′ (W_u W_v)ᵀ)."""
    wp = w_u @ w_v
    if stats.cross is None:  # the target is W·X′
        d = w - wp
        return float(((d @ stats.gram_compressed) * d).sum())
    return float(((w @ stats.gram) * w).sum() - 2 * ((w @ stats.cross) * wp).sum()
                 + ((wp @ stats.gram_compressed) * wp).sum())


def summarize(results: list[CompressionResult]) -> list[dict]:
    return [{"ratio": r.ratio, "out": str(r.out) if r.out else None, **r.params, **r.timings,
             "mean_truncation_loss": (sum(r.truncation_loss.values()) / max(len(r.truncation_loss), 1))
             if r.truncation_loss else math.nan} for r in results]
