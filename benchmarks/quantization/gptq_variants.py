"""Which GPTQ refinements pay on a real model: the relative output error ‖(W − Q)X‖² / ‖WX‖² that each variant
leaves on SmolLM2-135M's own weights and input Grams (the dense model's, one calibration pass), at int4 and int3 in
groups of 32, for every linear of four decoder layers (96 evenly spaced rows each: GPTQ treats rows independently).
Variants: round-to-nearest on the min-max grid; GPTQ with the columns in order; in act-order (decreasing H_ii);
in act-order with the clipping search on the grid (svdllm's GPTQ). Geometric means over the 28 matrices.
Usage: python benchmarks/quantization/gptq_variants.py OUT.json [NSAMPLES] [SEQLEN]   (one thread, about 10 min)
"""
import json
import math
import sys
import time

import torch

from svdllm.calibration import calibrate_layers
from svdllm.data.windows import calibration_set
from svdllm.quantization.gptq import Grid, gptq_codes, output_error, rtn_codes
from svdllm.io.loader import load_model
from svdllm.models.families import family_of

torch.set_num_threads(1)
LAYERS = (0, 5, 15, 25)
VARIANTS = {
    "rtn": lambda w, h, b: rtn_codes(w, Grid(b, 32)),
    "gptq, columns in order": lambda w, h, b: gptq_codes(w, h, Grid(b, 32), act_order=False),
    "gptq, act-order": lambda w, h, b: gptq_codes(w, h, Grid(b, 32)),
    "gptq, act-order + clipping search": lambda w, h, b: gptq_codes(w, h, Grid(b, 32, clip=True)),
}


def main(out: str, nsamples: int = 16, seqlen: int = 2048) -> None:
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    family = family_of(model)
    windows = calibration_set(tok, "wikitext2", nsamples, seqlen, 0)
    errors, rows = {}, []
    for i, stats in calibrate_layers(model, windows, progress=False):
        if i not in LAYERS:
            if i > max(LAYERS):
                break
            continue
        layer = family.decoder_layers(model)[i]
        for name in family.linear_names:
            gram = stats.grams[family.group_of[name]].to(torch.float64)
            w = layer.get_submodule(name).weight.detach().to(torch.float64)
            w = w[torch.linspace(0, w.shape[0] - 1, 96).round().long().unique()]
            norm = output_error(w, torch.zeros_like(w), gram)
            for bits in (4, 3):
                for variant, quantize in VARIANTS.items():
                    e = output_error(w, quantize(w, gram, bits).dequantized, gram) / norm
                    errors.setdefault(f"int{bits}", {}).setdefault(variant, []).append(e)
                    rows.append({"layer": i, "linear": name, "bits": bits, "variant": variant, "relative_error": e})
            print(i, name, flush=True)
    summary = {b: {v: math.exp(sum(map(math.log, e)) / len(e)) for v, e in by.items()} for b, by in errors.items()}
    for b, by in summary.items():
        print(b, " | ".join(f"{v}: {x:.5f}" for v, x in by.items()))
    result = {"model": "smollm2-135m", "calibration": {"dataset": "wikitext2", "nsamples": nsamples, "seqlen": seqlen,
              "seed": 0}, "layers": LAYERS, "rows_per_matrix": 96, "group_size": 32,
              "geomean_relative_error": summary, "matrices": rows, "wall_s": time.perf_counter() - t0}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
