"""Why the factorization methods rank as they do: the output error each leaves in every matrix on the calibration
data, in one measure that does not depend on the method that produced the factors:

  relative output error   e = ‖(W − W_u·W_v)·X‖²_F / ‖W·X‖²_F = tr(ΔW·XᵀX·ΔWᵀ) / tr(W·XᵀX·Wᵀ)

the quantity svd-llm minimises matrix by matrix, on the dense model's inputs X (so without the drift that earlier
compressed layers add). It comes from the Gram matrices the calibration pass cached (pass their folder: the one
`svdllm compress` logs, with `layer_*.safetensors` and `key.json`), so no activation is recomputed.
Usage: python benchmarks/method_errors.py STATS_DIR NAME=MODEL_DIR [NAME=MODEL_DIR ...] [--base smollm2-135m]
"""
from __future__ import annotations

import sys
from pathlib import Path
from statistics import median

import torch
from safetensors.torch import load_file

import svdllm
from svdllm.models.families import GROUP_OF, LINEAR_NAMES


@torch.no_grad()
def errors(stats_dir: Path, model_dir: str, dense) -> dict[str, list[float]]:
    """Matrix type -> the relative output error of each layer's matrix of that type."""
    model = svdllm.load(model_dir)
    out: dict[str, list[float]] = {n: [] for n in LINEAR_NAMES}
    layers = model.model.layers
    base_layers = dense.model.layers
    for i, layer in enumerate(layers):
        grams = {k[len("gram."):]: v for k, v in load_file(stats_dir / f"layer_{i:04d}.safetensors").items()
                 if k.startswith("gram.")}
        for name in LINEAR_NAMES:
            w = base_layers[i].get_submodule(name).weight.detach().to(torch.float64)
            lin = layer.get_submodule(name)
            approx = (lin.u.weight.double() @ lin.v.weight.double()) if hasattr(lin, "u") else lin.weight.double()
            g = grams[GROUP_OF[name]]
            d = w - approx
            out[name].append(float(torch.trace(d @ g @ d.T) / torch.trace(w @ g @ w.T)))
    return out


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
    print("| method | " + " | ".join(LINEAR_NAMES) + " | all (median) | all (max) |")
    print("|---|" + "---|" * (len(LINEAR_NAMES) + 2))
    for name, per in rows.items():
        every = [e for v in per.values() for e in v]
        cells = [f"{median(per[n]):.3g}" for n in LINEAR_NAMES]
        print(f"| {name} | " + " | ".join(cells) + f" | {median(every):.3g} | {max(every):.3g} |")


if __name__ == "__main__":
    main(sys.argv[1:])
