"""Gradient statistics of the language-model loss on the calibration windows, one decoder layer at a time.

Three quantities come out of one forward/backward pass per window:
- `rows`: the FWSVD row Fisher (Hsu et al. 2022), Σ_windows Σ_j (∂L/∂W_ij)² per output row of each weight;
- `outputs`: Σ_tokens (∂L/∂y_i)² per output channel of each linear, the diagonal of the output-gradient second
  moment G. Under the Kronecker (KFAC) approximation a change ΔW raises the loss by ≈ ½·tr(G·ΔW·XᵀX·ΔWᵀ), so G
  turns each matrix's output error into a predicted loss increase: the sensitivity the global allocator uses.
- `output_grams` (only when asked, for kfac-svd): the whole second moment G = Σ_tokens (∂L/∂y)(∂L/∂y)ᵀ per linear,
  m × m in float64. q, k and v share an input but not an output, so each linear has its own.

The pass never holds the whole model's activations or graph. Forward, one layer at a time, saving each layer's
input hidden states to disk; the final norm, LM head and loss in chunks of tokens, so that the full logits
(tokens × vocabulary) never exist at once; then backward from the top, one layer at a time: recompute the layer
from its saved input, back-propagate the incoming gradient, sum that layer's statistics, hand the input gradient
down. Peak memory is one layer's weights, its activations on the gradient windows and its statistics, whatever the
depth; the price is one extra forward per layer. A layer-wise (lazy) model reads each layer from its checkpoint
when it is needed.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..utils.atomic import atomic_path
from ..errors import SvdllmError
from ..models.families import family_of
from . import distributed
from .layerwise import chunk_nll, token_chunks
from .walk import LayerProcessor, Step, Walk, layer_output, shard_windows, walk_backward

@dataclass
class GradientStats:
    rows: dict[str, torch.Tensor]  # name -> Σ_windows Σ_j (∂L/∂W_ij)², float64 (m,)
    outputs: dict[str, torch.Tensor]  # name -> Σ_tokens (∂L/∂y_i)², float64 (m,)
    windows: int
    output_grams: Mapping[str, torch.Tensor] | None = None  # name -> Σ_tokens (∂L/∂y)(∂L/∂y)ᵀ, float64 (m, m)


def head_gradient(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(∂L/∂h, L) for one window: h (1, T, d) the last decoder layer's output, L the window's mean next-token
    cross-entropy as `model(input_ids=ids, labels=ids).loss` computes it, its logits a chunk of tokens at a time."""
    n = ids.shape[-1] - 1  # the last position predicts nothing
    grad, total = torch.zeros_like(hidden), 0.0
    for s, e in token_chunks(model, n):
        h = hidden[:, s:e].detach().requires_grad_(True)
        with torch.enable_grad():
            loss = chunk_nll(model, h, ids[:, s : e + 1], (0, e - s)) / n
            loss.backward()
        grad[:, s:e] = h.grad
        total += loss.item()
    return grad, total


class _PassFiles:
    """A gradient pass's intermediate tensors, one safetensors file each: every decoder layer's input on the gradient
    windows (`input_i`, from the forward) and the gradient at the input of the lowest layer the backward has finished
    (`grad_i`; `grad_L` is the loss's, at the last layer's output). In a directory that outlives the process, an
    interrupted pass resumes from them."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.safetensors"

    def put(self, name: str, tensors: list[torch.Tensor]) -> None:
        with atomic_path(self._path(name)) as tmp:
            save_file({"t": torch.cat([t.detach().to("cpu") for t in tensors]).contiguous()}, tmp)

    def get(self, name: str) -> list[torch.Tensor] | None:
        path = self._path(name)
        return list(load_file(path)["t"].split(1)) if path.exists() else None

    def has(self, name: str) -> bool:
        return self._path(name).exists()

    def drop(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)


class LayerGradients(Mapping):
    """A gradient pass's results on disk, one safetensors file per decoder layer (its linears' row Fisher, output
    diagonals and, when asked, output Grams), written as the backward pass leaves the layer. As a Mapping it gives
    the Grams by linear name, one file read at a time: the factorization's memory holds one."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def _path(self, i: int) -> Path:
        return self.dir / f"layer_{i:04d}.safetensors"

    def write(self, i: int, rows: dict, outputs: dict, grams: dict | None, gram_dtype=torch.float64) -> None:
        tensors = {f"rows.{k}": v for k, v in rows.items()} | {f"outputs.{k}": v for k, v in outputs.items()}
        tensors |= {f"gram.{k}": v.to(gram_dtype) for k, v in (grams or {}).items()}  # summed in float64 either way
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._path(i)) as tmp:  # under torchrun every rank writes its (identical) sums
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)

    def has(self, i: int) -> bool:
        return self._path(i).exists()

    def complete(self, num_layers: int) -> bool:
        return all(self.has(i) for i in range(num_layers))

    def vectors(self, i: int) -> tuple[dict, dict]:
        """Layer i's (rows, outputs)."""
        from safetensors import safe_open

        with safe_open(self._path(i), framework="pt") as f:
            pick = lambda prefix: {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: E731
            return pick("rows."), pick("outputs.")

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        # a linear's name holds its layer index as the first number ("model.decoder.layers.3.fc1"), in every family
        i = next((int(part) for part in name.split(".") if part.isdigit()), None)
        if i is None or not self.has(i):
            raise KeyError(name)
        with safe_open(self._path(i), framework="pt") as f:
            if f"gram.{name}" not in f.keys():
                raise KeyError(name)
            return f.get_tensor(f"gram.{name}")

    def __iter__(self):
        from safetensors import safe_open

        for path in sorted(self.dir.glob("layer_*.safetensors")):
            with safe_open(path, framework="pt") as f:
                yield from [k[len("gram."):] for k in f.keys() if k.startswith("gram.")]

    def __len__(self) -> int:
        return sum(1 for _ in self)


def gradient_stats(model: nn.Module, windows: torch.Tensor, progress: bool = True, output_grams: bool = False,
                   directory: str | Path | None = None, gram_dtype: torch.dtype = torch.float64) -> GradientStats:
    """One forward and backward pass per calibration window, a decoder layer at a time (module docstring): the forward
    walk with `SavedInputs` (each layer's input to disk), then the backward walk from the top.

    With a `directory`, each layer's results go there as the backward pass leaves the layer (LayerGradients, which
    the returned statistics read their Grams from), and the pass's intermediate tensors to its `pass-rank<r>/`
    sub-directory, removed at the end: a pass interrupted and started again with the same directory resumes at the
    layer where it stopped. Without one, everything is kept in memory and a temporary directory. The Grams are summed
    in float64 and stored in `gram_dtype` (float32 halves their disk; kfac-svd reads them back as float64)."""
    windows = shard_windows(windows, "--grad-samples")  # under torchrun: this rank's windows; sums all-reduced
    family = family_of(model)
    temporary = tempfile.TemporaryDirectory(prefix="svdllm-gradients-") if directory is None else None
    results = LayerGradients(temporary.name if temporary else directory)
    files = _PassFiles(results.dir / f"pass-rank{distributed.rank()}")
    if distributed.active():  # ranks that resumed at different layers would wait in different collectives
        shutil.rmtree(files.dir, ignore_errors=True)
        files.dir.mkdir(parents=True)
    was_training = model.training
    model.eval()
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        walk = Walk(model, windows, progress=progress, shard=None)
        walk.capture()  # every layer's keyword arguments, which the backward needs too
        num_layers = len(walk.layers)
        top = next((i for i in range(num_layers + 1) if files.has(f"grad_{i}")), None)  # where the backward was
        if top is None:
            walk.run(SavedInputs(files, windows))
            top = num_layers
        grads = [files.get(f"grad_{top}")]

        def backward(i: int, layer: nn.Module) -> None:
            rows, outputs = {}, {}
            grads[0], grams = _layer_backward(family, i, layer, files.get(f"input_{i}"), grads[0],
                                              walk.layer_kwargs[i], walk.device, rows, outputs, output_grams)
            reduce = distributed.all_reduce_sum
            results.write(i, reduce(rows), reduce(outputs), reduce(grams) if grams is not None else None, gram_dtype)
            files.put(f"grad_{i}", grads[0])  # after the layer's results: a resumed pass never skips a layer
            files.drop(f"grad_{i + 1}")
            files.drop(f"input_{i}")

        walk_backward(model, top, backward, progress, desc="gradients (backward)")
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(previous.get(name, False))
        model.train(was_training)
    shutil.rmtree(files.dir, ignore_errors=True)
    rows, outputs = {}, {}
    for i in range(num_layers):
        r, o = results.vectors(i)
        for name in (family.linear_name(i, n) for n in family.linear_names):  # in the order the family lists them
            rows[name], outputs[name] = r[name], o[name]
    for name in rows:
        if not (torch.isfinite(rows[name]).all() and torch.isfinite(outputs[name]).all()):
            raise SvdllmError(f"The gradients of {name} overflowed to inf/NaN; load the model with --dtype float32.")
    grams = None
    if output_grams:
        grams = dict(results.items()) if temporary else results
    if temporary:
        temporary.cleanup()
    return GradientStats(rows, outputs, distributed.sum_int(len(windows)), grams)


class SavedInputs(LayerProcessor):
    """The gradient pass's forward: each layer's input to `files` (from the last one an interrupted forward saved),
    then the loss's gradient at the last layer's output (`grad_L`)."""

    desc = "gradients (forward)"

    def __init__(self, files: _PassFiles, windows: torch.Tensor):
        self.files, self.windows = files, windows

    def start(self, walk: Walk) -> None:
        n = len(walk.layers)
        walk.first = max((i for i in range(n + 1) if self.files.has(f"input_{i}")), default=0)
        if walk.first > 0:
            walk.hidden = self.files.get(f"input_{walk.first}")

    def layer(self, step: Step) -> list[torch.Tensor]:
        self.files.put(f"input_{step.i}", step.inputs)
        return step.run(in_place=True)  # the input is on disk now: its memory takes the output

    def finish(self, walk: Walk) -> None:
        grads = []
        for k, h in enumerate(walk.hidden):
            g, loss = head_gradient(walk.model, h.to(walk.device), self.windows[k : k + 1].to(walk.device))
            if not math.isfinite(loss):
                raise SvdllmError(f"Non-finite loss on gradient window {k}; load the model with --dtype float32.")
            grads.append(g)
        self.files.put(f"grad_{len(walk.layers)}", grads)


def _layer_backward(family, i: int, layer: nn.Module, inputs: list[torch.Tensor], grads: list[torch.Tensor],
                    kwargs: dict, device, rows: dict, outputs: dict, with_grams: bool):
    """Back-propagate each window's output gradient through decoder layer i (recomputed from its saved input),
    adding the layer's statistics to `rows` and `outputs`; returns (the input gradients, the layer's Grams)."""
    linears = {family.linear_name(i, n): layer.get_submodule(n) for n in family.linear_names}
    for name, m in linears.items():
        rows[name] = torch.zeros(m.out_features, dtype=torch.float64)
        outputs[name] = torch.zeros(m.out_features, dtype=torch.float64)
    grams = {name: torch.zeros(m.out_features, m.out_features, dtype=torch.float64, device=device)
             for name, m in linears.items()} if with_grams else None

    def output_hook(name):
        def accumulate(g):
            g = g.detach().to(torch.float64).reshape(-1, g.shape[-1])
            outputs[name] += g.pow(2).sum(0).cpu()
            if grams is not None:
                grams[name].addmm_(g.T, g)  # in place: no m × m temporary

        def hook(module, args, out):  # a tensor hook on the output sees ∂L/∂y during backward
            if out.requires_grad:
                out.register_hook(accumulate)
        return hook

    for m in linears.values():
        m.weight.requires_grad_(True)
    handles = [m.register_forward_hook(output_hook(name)) for name, m in linears.items()]
    below = []
    try:
        for x, g in zip(inputs, grads):
            x = x.to(device).requires_grad_(True)
            with torch.enable_grad():
                out = layer_output(layer(x, **kwargs))
            out.backward(g.to(device, out.dtype))
            for name, m in linears.items():
                if m.weight.grad is not None:  # (None: an expert no token of this window was routed to)
                    _add_row_squares(rows[name], m.weight.grad.detach())
                m.weight.grad = None
            below.append(x.grad.detach())
    finally:
        for h in handles:
            h.remove()
        for m in linears.values():
            m.weight.requires_grad_(False)
    return below, None if grams is None else {k: v.cpu() for k, v in grams.items()}


def _add_row_squares(acc: torch.Tensor, w: torch.Tensor, block: int = 1024) -> None:
    """acc += Σ_j w_ij² in float64, a block of rows at a time: no float64 copy of a whole weight gradient."""
    for s in range(0, w.shape[0], block):
        acc[s : s + block] += w[s : s + block].to(torch.float64).pow(2).sum(1).cpu()


def fisher_rows(model: nn.Module, windows: torch.Tensor, progress: bool = True) -> dict[str, torch.Tensor]:
    """name -> Σ over windows of Σ_j (∂L/∂W_ij)² (FWSVD's row Fisher)."""
    return gradient_stats(model, windows, progress).rows
