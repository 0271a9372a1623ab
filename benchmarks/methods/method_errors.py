"""Why the factorization methods rank as they do: the output error each leaves in every matrix on the calibration
data, in one measure that does not depend on the method that produced the factors:

  relative output error   e = ‖(W − W_u·W_v)·X‖²_F / ‖W·X‖²_F = tr(ΔW·XᵀX·ΔWᵀ) / tr(W·XᵀX·Wᵀ)

the quantity svd-llm minimises matrix by matrix, on the dense model's inputs X (so without the drift that earlier
compressed layers add); and, where the gradient pass's output Grams are cached (kfac-svd made them), the
second-order estimate of the calibration loss increase that kfac-svd minimises,

  ΔL ≈ ½ Σ_matrices tr(GᵀG·ΔW·XᵀX·ΔWᵀ) / tokens      (G: the loss gradients at the matrix's output)

summed over the model and given as a ratio to svd-llm's (the constants cancel); the error that is left once W_u is
re-fitted by least squares to the method's own W_v (what the closed-form update reaches, here on the dense inputs):

  e_v = min over W_u of ‖(W − W_u·W_v)·X‖²_F / ‖W·X‖²_F,   W_u = W·XᵀX·W_vᵀ·(W_v·XᵀX·W_vᵀ)⁻¹

which depends only on the row space the method chose for W_v (svd-llm's W_u is already that minimum); and how
much the factors can amplify an input the calibration data did not show, ‖W_u·W_v‖₂ / ‖W‖₂ (at most 1 for a plain
truncated SVD, an orthogonal projection; an oblique one, as every whitened method's, can exceed it). All come from
the statistics the passes cached (pass their folder: the one `svdllm compress` logs, with `layer_*.safetensors` and
`key.json`), so no activation is recomputed.
Usage: python benchmarks/methods/method_errors.py STATS_DIR NAME=MODEL_DIR [NAME=MODEL_DIR ...] [--base smollm2-135m]
"""
from __future__ import annotations

import sys
from pathlib import Path
from statistics import median

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import svdllm
from svdllm.models.families import GROUP_OF, LINEAR_NAMES


def _refitted_error(wg: torch.Tensor, total: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> float:
    """e_v: the relative output error with the least-squares W_u for this W_v (wg = W·XᵀX, total = tr(W·XᵀX·Wᵀ))."""
    b = wg @ v.T
    kept = torch.trace(b @ torch.linalg.lstsq(v @ g @ v.T, b.T).solution)  # lstsq: W_v·XᵀX·W_vᵀ can be singular
    return float((total - kept) / total)


@torch.no_grad()
def errors(stats_dir: Path, model_dir: str, dense):
    """(matrix type -> the relative output error of each layer's matrix of that type, the summed KFAC loss
    estimate or None without cached output Grams, the gain ‖W_uW_v‖₂/‖W‖₂ of every matrix, the refitted error
    e_v of every factored matrix)."""
    model = svdllm.load(model_dir)
    out: dict[str, list[float]] = {n: [] for n in LINEAR_NAMES}
    refit: list[float] = []
    grads = sorted(stats_dir.glob("gradient_grams_*.safetensors"))
    fisher = safe_open(grads[-1], framework="pt") if grads else None
    kfac, gain = 0.0, []
    for i, layer in enumerate(model.model.layers):
        path = stats_dir / f"layer_{i:04d}.safetensors"
        with safe_open(path, framework="pt") as f:
            tokens = int(f.metadata()["tokens"])
        grams = {k[len("gram."):]: v for k, v in load_file(path).items() if k.startswith("gram.")}
        for name in LINEAR_NAMES:
            w = dense.model.layers[i].get_submodule(name).weight.to(torch.float64)
            lin = layer.get_submodule(name)
            approx = (lin.u.weight.double() @ lin.v.weight.double()) if hasattr(lin, "u") else lin.weight.double()
            g, d = grams[GROUP_OF[name]], w - approx
            wg = w @ g
            total = torch.trace(wg @ w.T)
            out[name].append(float(torch.trace(d @ g @ d.T) / total))
            gain.append(float(torch.linalg.matrix_norm(approx, 2) / torch.linalg.matrix_norm(w, 2)))
            if hasattr(lin, "u"):
                refit.append(_refitted_error(wg, total, lin.v.weight.double(), g))
            if fisher is not None:
                kfac += 0.5 * float(torch.trace(fisher.get_tensor(f"model.layers.{i}.{name}") @ d @ g @ d.T)) / tokens
    return out, (kfac if fisher is not None else None), gain, refit


def main(argv: list[str]) -> None:
    base = "smollm2-135m"
    if "--base" in argv:
        k = argv.index("--base")
        base, argv = argv[k + 1], argv[:k] + argv[k + 2:]
    loaded = svdllm.load_model(base)
    dense = loaded[0] if isinstance(loaded, tuple) else loaded
    stats_dir = Path(argv[0])
    rows = {}
    for spec in argv[1:]:
        name, _, path = spec.partition("=")
        rows[name] = errors(stats_dir, path, dense)
    ref = rows.get("svd-llm", next(iter(rows.values())))[1]
    print("| method | " + " | ".join(n.split(".")[-1] for n in LINEAR_NAMES)
          + " | all (median) | all (max) | KFAC loss estimate / svd-llm's | ‖W_uW_v‖₂/‖W‖₂ (median, max) "
          + "| with W_u refitted (median) |")
    print("|---|" + "---|" * (len(LINEAR_NAMES) + 5))
    for name, (per, kfac, gain, refit) in rows.items():
        every = [e for v in per.values() for e in v]
        cells = [f"{median(per[n]):.3g}" for n in LINEAR_NAMES]
        ratio = f"{kfac / ref:.3g}" if kfac is not None and ref else "–"
        refitted = f"{median(refit):.3g}" if refit else "–"
        print(f"| {name} | " + " | ".join(cells) + f" | {median(every):.3g} | {max(every):.3g} | {ratio} | "
              f"{median(gain):.3g}, {max(gain):.3g} | {refitted} |")


if __name__ == "__main__":
    main(sys.argv[1:])
