"""What the forward walk (walk.py) gathers at each layer: the input statistics of every linear (InputStatistics)
and the model's loss with some matrices changed (LossMeasurement).

Peak memory is the calibration activations of one layer plus that layer's Gram matrices, never the whole model's.
For every group of linears that read the same tensor (q/k/v, gate/up, o, down) one Gram matrix XᵀX is
accumulated in float64: 4 per layer, not 7.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..models.families import family_of
from . import distributed
from .walk import LayerProcessor, Step, Walk, check_finite


@dataclass
class LinearStats:
    """What a factorization method may know about one linear's inputs X (tokens × n)."""

    gram: torch.Tensor | None = None  # XᵀX, float64, n × n
    abs_sum: torch.Tensor | None = None  # Σ_t |x_t|, float64, n (ASVD's activation scale is abs_sum / tokens)
    tokens: int = 0
    fisher_rows: torch.Tensor | None = None  # Σ_j (∂L/∂W_ij)², float64, m (FWSVD)
    output_gram: torch.Tensor | None = None  # Σ_t g_t g_tᵀ, g = ∂L/∂y, float64, m × m (kfac-svd)
    gram_compressed: torch.Tensor | None = None  # X′ᵀX′ of the compressed model's inputs X′, n × n
    cross: torch.Tensor | None = None  # XᵀX′, dense-model inputs against compressed-model ones, n × n

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class LayerStats:
    """Statistics of one decoder layer's linear inputs, per input group (float64, summed over tokens)."""

    grams: dict[str, torch.Tensor]
    abs_sums: dict[str, torch.Tensor]
    tokens: int
    # with a compressed-model stream X′ beside the dense one (closed-form update): XᵀX′ and X′ᵀX′
    cross: dict[str, torch.Tensor] | None = None
    grams_compressed: dict[str, torch.Tensor] | None = None

    def for_group(self, g: str) -> LinearStats:
        """What the linears of input group `g` know about their (shared) input."""
        if self.grams_compressed is None:
            return LinearStats(self.grams[g], self.abs_sums[g], self.tokens)
        return LinearStats(self.grams[g], self.abs_sums[g], self.tokens, gram_compressed=self.grams_compressed.get(g),
                           cross=(self.cross or {}).get(g))


def linear_stats(stats: LayerStats | None, grads, full: str, group: str) -> LinearStats:
    """Everything known about linear `full` (of input group `group`): its input statistics from `stats`, and from
    the gradient statistics `grads` (a GradientStats or None) its row Fisher and output-gradient Gram."""
    out = stats.for_group(group) if stats is not None else LinearStats()
    if grads is not None:
        out.fisher_rows = grads.rows[full]
        if grads.output_grams is not None:
            out.output_gram = grads.output_grams[full]
    return out


class _GroupInputs:
    """Forward hooks that record, for the batch being run, the input of the first linear of each group
    (`groups`: group -> the linears reading that input, as a Family lists them)."""

    def __init__(self, layer: nn.Module, groups: dict[str, tuple[str, ...]], where: str):
        self.current: dict[str, torch.Tensor] = {}
        self.handles = []
        for group, names in groups.items():
            def hook(module, args, out, group=group, name=names[0]):
                x = args[0].reshape(-1, args[0].shape[-1])
                check_finite(x, f"{where}.{name}")
                self.current[group] = x.to(torch.float64)

            self.handles.append(layer.get_submodule(names[0]).register_forward_hook(hook))

    def take(self) -> dict[str, torch.Tensor]:
        out, self.current = self.current, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def accumulate(acc: dict, key: str, value: torch.Tensor) -> None:
    if key in acc:
        acc[key] += value
    else:
        acc[key] = value


def accumulate_product(acc: dict, key: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc[key] += a @ b in place: the product never exists apart (a 14,336² Gram of a Llama-3-8B MLP is 1.6 GB)."""
    if key in acc:
        acc[key].addmm_(a, b)
    else:
        acc[key] = a @ b


@torch.no_grad()
def layer_statistics(step: Step, groups: dict[str, tuple[str, ...]], in_place: bool = False,
                     inputs: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], LayerStats]:
    """Run the layer of `step` on its inputs (or `inputs`) and return (outputs, LayerStats): the Gram matrix XᵀX and
    Σ|x| of each group's input, accumulated in float64 batch by batch."""
    grams, abs_sums = {}, {}
    capture = _GroupInputs(step.layer, groups, step.where)

    def add() -> None:
        for g, x in capture.take().items():
            accumulate_product(grams, g, x.T, x)
            accumulate(abs_sums, g, x.abs().sum(0))

    try:
        outputs = step.run(in_place, inputs, after_batch=add)
    finally:
        capture.remove()
    for g, names in groups.items():  # an expert no calibration token was routed to: its input has no moments
        if g not in grams:
            n = step.layer.get_submodule(names[0]).in_features
            grams[g], abs_sums[g] = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    cpu = lambda d: {g: t.to("cpu") for g, t in d.items()}  # noqa: E731
    tokens = sum(int(h.shape[0] * h.shape[1]) for h in outputs)
    return outputs, LayerStats(cpu(grams), cpu(abs_sums), tokens)


def sum_over_ranks(stats: LayerStats) -> LayerStats:
    if not distributed.active():
        return stats
    reduce = lambda d: None if d is None else distributed.all_reduce_sum(d)  # noqa: E731
    return LayerStats(reduce(stats.grams), reduce(stats.abs_sums), distributed.sum_int(stats.tokens),
                      reduce(stats.cross), reduce(stats.grams_compressed))


class InputStatistics(LayerProcessor):
    """The calibration processor: each layer's input statistics (summed over ranks under torchrun), handed to `use`.

    `cached(i)` may return layer i's statistics from an earlier, interrupted run: the layer then only runs forward
    (no Gram accumulation, most of a layer's cost). With `sequential`, `use` may change the layer (factorize it,
    quantize it) and the layer's outputs are then recomputed with the changed layer before they feed the next one:
    every layer sees the activations of the already-compressed layers before it (the sequential mode). Without it,
    the dense model's activations flow on, whatever `use` did to the layer."""

    desc = "calibration"

    def __init__(self, cached: Callable[[int], LayerStats | None] | None = None, sequential: bool = False,
                 use: Callable[[int, nn.Module, LayerStats], None] | None = None):
        self.cached, self.sequential, self._use = cached, sequential, use

    def gather(self, step: Step) -> tuple[LayerStats, list[torch.Tensor]]:
        """(the layer's statistics, its outputs before any change)."""
        stats = self.cached(step.i) if self.cached is not None else None
        if stats is None:
            outputs, stats = layer_statistics(step, step.family.groups, in_place=not self.sequential)
            return sum_over_ranks(stats), outputs
        return stats, step.run(in_place=not self.sequential)

    def use(self, step: Step, stats: LayerStats) -> None:
        if self._use is not None:
            self._use(step.i, step.layer, stats)

    def layer(self, step: Step) -> list[torch.Tensor]:
        stats, outputs = self.gather(step)
        self.use(step, stats)
        return step.run() if self.sequential else outputs


def calibrate_layers(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
                     cached: Callable[[int], LayerStats | None] | None = None,
                     sequential: bool = False) -> Iterator[tuple[int, LayerStats]]:
    """InputStatistics as a generator: (layer index, statistics) for every decoder layer, one layer at a time; while
    it waits at its yield, the consumer may change layer i (see InputStatistics for `cached` and `sequential`)."""
    processor = InputStatistics(cached, sequential)
    walk = Walk(model, windows, batch_size, progress)
    for step in walk.steps(processor.desc):
        stats, outputs = processor.gather(step)
        yield step.i, stats
        walk.pass_on(step.run() if sequential else outputs)


LOGIT_CHUNK_ELEMENTS = 2**25  # logits formed at once by the loss: 128 MB in float32, whatever the vocabulary


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits of the last decoder layer's output as the model's forward forms them: final norm (and OPT's
    projection), LM head and, where the family has it (Gemma), soft-capping."""
    for module in family_of(model).head_modules(model):
        hidden = module(hidden)
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def token_chunks(model: nn.Module, predictions: int) -> list[tuple[int, int]]:
    """[start, end) spans of positions whose logits fit LOGIT_CHUNK_ELEMENTS together: the full logits of a window
    (2048 × 262,144 for Gemma 3: 2 GB) never exist at once. The final norm acts per token, so chunks are exact."""
    step = max(1, LOGIT_CHUNK_ELEMENTS // model.get_output_embeddings().weight.shape[0])
    return [(s, min(s + step, predictions)) for s in range(0, predictions, step)]


def chunk_nll(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """Σ of the next-token cross-entropies at positions [s, e) of one window (hidden (1, T, d), ids (1, T)),
    in float32 as transformers' loss computes it, or float64 for a float64 model."""
    s, e = span
    logits = head_logits(model, hidden[:, s:e])
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(e - s, -1), ids[0, s + 1 : e + 1], reduction="sum")


class LossMeasurement(LayerProcessor):
    """The mean over the windows of each window's mean next-token loss (`model(input_ids=w, labels=w).loss`), one
    decoder layer at a time: memory holds one layer and one window's logits chunk, whatever the depth. While layer
    i runs, the context `changed(i)` is entered (the allocation's measurements truncate the layer's matrices)."""

    check_outputs = False  # a non-finite loss is the caller's to name (it knows what was truncated)

    def __init__(self, windows: torch.Tensor,
                 changed: Callable[[int], contextlib.AbstractContextManager] | None = None):
        self.windows, self.changed = windows, changed

    def layer(self, step: Step) -> list[torch.Tensor]:
        with self.changed(step.i) if self.changed is not None else contextlib.nullcontext():
            return step.run()

    def finish(self, walk: Walk) -> float:
        model, windows, total = walk.model, self.windows, 0.0
        for k, h in enumerate(walk.hidden):
            ids, n = windows[k : k + 1].to(walk.device), windows.shape[1] - 1
            h = h.to(walk.device)
            total += sum(float(chunk_nll(model, h, ids, span)) for span in token_chunks(model, n)) / n
        return total / len(walk.hidden)


@torch.no_grad()
def layerwise_loss(model: nn.Module, windows: torch.Tensor,
                   changed: Callable[[int], contextlib.AbstractContextManager] | None = None,
                   inputs: tuple | None = None) -> float:
    """LossMeasurement's loss on `windows`. `inputs`: what `capture_layer_inputs(model, windows)` returns, when many
    measurements share the windows."""
    return Walk(model, windows, progress=False, shard=None, inputs=inputs).run(LossMeasurement(windows, changed))
