"""The synthetic Llama-3-8B-shaped run (benchmarks/scale/synthetic_8b.sh) per decoder layer, and on paper for 32 layers
at the protocol's calibration, on this CPU and on one GPU.

The run has LAYERS decoder layers and a small calibration; its phase times include costs paid once per model or per
measurement, not per layer: the LM head's forward and backward on the gradient windows, and its forward in each of
the allocator's loss measurements. Those are timed here on the same model (the head alone, same tokens), taken out,
and the rest divided by LAYERS. Scaling to the protocol (64 × 2048 calibration tokens, 8 × 2048 gradient tokens,
one 2048-token measurement window): the forward and gradient passes and the measurements are linear in tokens (the
attention's T² term is 4% of a layer's FLOPs at 2048 tokens, left out); the spectra do not depend on tokens.
The GPU column is FLOPs over a stated rate: A100 80 GB, FP32 19.5 TFLOP/s for the layers, FP64 tensor cores
19.5 TFLOP/s for the Grams and decompositions, at half of peak. It is an estimate, not a measurement.
Usage: python benchmarks/scale/extrapolate_8b.py RESULTS_DIR MODEL_DIR   (writes RESULTS_DIR/extrapolation.json)
"""
import json
import sys
import time
from pathlib import Path

import torch

import svdllm  # noqa: F401
from svdllm.calibration.fisher import head_gradient
from svdllm.calibration.layerwise import chunk_nll, token_chunks
from svdllm.models.lazy import load_lazy

HIDDEN, KV, MLP, VOCAB, LAYERS_8B = 4096, 1024, 14336, 128256, 32
SHAPES = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
          "gate": (MLP, HIDDEN), "up": (MLP, HIDDEN), "down": (HIDDEN, MLP)}  # (out m, in n)
PARAMS = sum(m * n for m, n in SHAPES.values())  # 218,103,808 per layer
INPUT_GRAM_DIMS = [HIDDEN, HIDDEN, HIDDEN, MLP]  # q/k/v, o, gate/up, down: one Gram per input group
PROTOCOL = {"nsamples": 64, "grad_samples": 8, "seqlen": 2048}
GPU_FLOPS = 0.5 * 19.5e12  # half of an A100's FP32 (and FP64 tensor-core) peak


def flops_per_layer(tokens_fwd: int, tokens_grad: int, tokens_measure: int, measurements: int) -> dict:
    """FLOPs of one decoder layer in each phase (multiply-add = 2)."""
    grams_in = 2 * tokens_fwd * sum(n * n for n in INPUT_GRAM_DIMS)
    grams_out = 2 * tokens_grad * sum(m * m for m, _ in SHAPES.values())
    # forward saving the input, forward again, backward to the input and to the weights (the row Fisher)
    grad = 8 * PARAMS * tokens_grad + grams_out
    # per matrix: Cholesky of both Grams (n³/3), L_gᵀ·W·L_x, thin SVD (R-SVD, 6·max·k² + 20k³, k = min(m, n)),
    # two triangular solves
    spectra = sum(m**3 / 3 + n**3 / 3 + 2 * m * m * n + 2 * m * n * n + 6 * max(m, n) * min(m, n) ** 2
                  + 20 * min(m, n) ** 3 + m * m * min(m, n) + n * n * min(m, n) for m, n in SHAPES.values())
    return {"forward": 2 * PARAMS * tokens_fwd + grams_in, "gradient": grad, "spectra": spectra,
            "allocation": measurements * 2 * PARAMS * tokens_measure}


def head_times(model_dir: Path, grad_samples: int, seqlen: int) -> tuple[float, float]:
    """(head forward + backward on the gradient windows, head forward on one measurement window), in seconds."""
    model, _ = load_lazy(model_dir, torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (1, seqlen))
    hidden = torch.randn(1, seqlen, HIDDEN)
    # once untimed: the first call reads the head's 2.1 GB from disk (the run had it in memory), which would
    # otherwise be taken out of the layers' share
    head_gradient(model, hidden, ids)
    t = time.perf_counter()
    for _ in range(grad_samples):
        head_gradient(model, hidden, ids)
    t_grad = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        sum(float(chunk_nll(model, hidden, ids, span)) for span in token_chunks(model, seqlen - 1))
    return t_grad, time.perf_counter() - t


def measurement_count(manifest: dict) -> int:
    rounds = manifest["allocation"]["rounds"]
    return 1 + sum(len(r["types"]) + 1 for r in rounds)  # the base loss, each type, each round's allocation


def main(results: Path, model_dir: Path) -> None:
    run = json.loads((results / "compress.json").read_text())["results"][0]
    disk = json.loads((results / "disk.json").read_text())
    manifest = json.loads((model_dir.parent / "out" / "svdllm_manifest.json").read_text())
    L, seqlen = disk["layers"], disk["seqlen"]
    tokens = {"fwd": disk["nsamples"] * seqlen, "grad": disk["grad_samples"] * seqlen, "measure": seqlen}
    M = measurement_count(manifest)
    head_grad, head_fwd = head_times(model_dir, disk["grad_samples"], seqlen)
    per_layer = {"forward": run["calibration_s"] / L, "gradient": (run["gradient_pass_s"] - head_grad) / L,
                 "spectra": run["spectra_s"] / L, "allocation": (run["loss_scale_s"] - M * head_fwd) / L}
    per_layer["factorization and save"] = (run["total_s"] - sum(run[k] for k in (
        "calibration_s", "gradient_pass_s", "spectra_s", "loss_scale_s"))) / L
    scale = {"forward": PROTOCOL["nsamples"] * PROTOCOL["seqlen"] / tokens["fwd"],
             "gradient": PROTOCOL["grad_samples"] * PROTOCOL["seqlen"] / tokens["grad"], "spectra": 1.0,
             "allocation": PROTOCOL["seqlen"] / tokens["measure"], "factorization and save": 1.0}
    fixed = {"gradient": head_grad * scale["gradient"], "allocation": M * head_fwd * scale["allocation"]}
    cpu_32 = {k: LAYERS_8B * v * scale[k] + fixed.get(k, 0.0) for k, v in per_layer.items()}
    gpu_flops = flops_per_layer(PROTOCOL["nsamples"] * PROTOCOL["seqlen"], PROTOCOL["grad_samples"] *
                                PROTOCOL["seqlen"], PROTOCOL["seqlen"], M)
    head_flops = {"gradient": 4 * VOCAB * HIDDEN * PROTOCOL["grad_samples"] * PROTOCOL["seqlen"],
                  "allocation": M * 2 * VOCAB * HIDDEN * PROTOCOL["seqlen"]}
    gpu_32 = {k: (LAYERS_8B * f + head_flops.get(k, 0)) / GPU_FLOPS for k, f in gpu_flops.items()}
    out = {"run": {"layers": L, "tokens": tokens, "measurements": M, "phases_s": {k: run[k] for k in (
               "calibration_s", "gradient_pass_s", "spectra_s", "loss_scale_s", "total_s")},
               "peak_rss_mb": {k: run[k] for k in run if k.startswith("peak_rss")}},
           "head_s": {"gradient_windows": head_grad, "one_measurement": head_fwd},
           "per_layer_s": per_layer, "protocol_scale": scale,
           "cpu_32_layers_protocol_s": cpu_32, "cpu_32_layers_protocol_h": sum(cpu_32.values()) / 3600,
           "gpu_flops_per_layer": gpu_flops, "gpu_32_layers_protocol_s": gpu_32,
           "gpu_32_layers_protocol_min": sum(gpu_32.values()) / 60,
           "disk_per_layer_gb": {"input_statistics": disk["input_stats_bytes"] / L / 1e9,
                                 "gradient_statistics": disk["gradient_stats_bytes"] / L / 1e9,
                                 "decomposition_store": 8 * PARAMS / 1e9},
           "disk_32_layers_gb": {"input_statistics": LAYERS_8B * disk["input_stats_bytes"] / L / 1e9,
                                 "gradient_statistics": LAYERS_8B * disk["gradient_stats_bytes"] / L / 1e9,
                                 "decomposition_store": LAYERS_8B * 8 * PARAMS / 1e9}}
    (results / "extrapolation.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
