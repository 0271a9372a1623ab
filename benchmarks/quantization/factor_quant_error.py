"""Is a compressed model's int4 cost in its matrices or in its sensitivity? The relative output error
‖(W − Q)X‖² / ‖WX‖² that int4 leaves on each linear of a compressed model (a low-rank pair: W = W_u·W_v against
Q_u·Q_v, GPTQ's pair update of svdllm quantize, in the basis of gptq.gauge and in the factorization's own; a matrix
the allocation kept dense: GPTQ alone), on that model's own input Grams, beside round-to-nearest on both. Same layers, rows, groups and calibration as gptq_variants.py, whose
dense numbers it is read against.
Usage: python benchmarks/quantization/factor_quant_error.py MODEL_DIR OUT.json [NSAMPLES] [SEQLEN]   (one thread, a few minutes)
"""
import json
import math
import sys
import time

import torch

import svdllm
from svdllm.calibration import calibrate_layers
from svdllm.data.windows import calibration_set
from svdllm.quantization.gptq import Grid, gptq_codes, gptq_low_rank_codes, output_error, rtn_codes
from svdllm.models.families import family_of
from svdllm.nn.low_rank import LowRankLinear

torch.set_num_threads(1)
LAYERS = (0, 5, 15, 25)


def main(model_dir: str, out: str, nsamples: int = 16, seqlen: int = 2048) -> None:
    t0 = time.perf_counter()
    model, tok = svdllm.load(model_dir, with_tokenizer=True)
    family = family_of(model)
    windows = calibration_set(tok, "wikitext2", nsamples, seqlen, 0)
    grid = Grid(4, 32, clip=True)
    errors, rows = {}, []
    for i, stats in calibrate_layers(model, windows, progress=False):
        if i > max(LAYERS):
            break
        if i not in LAYERS:
            continue
        layer = family.decoder_layers(model)[i]
        for name in family.linear_names:
            gram = stats.grams[family.group_of[name]].to(torch.float64)
            module = layer.get_submodule(name)
            if isinstance(module, LowRankLinear):
                w_u, w_v = module.u.weight.detach().double(), module.v.weight.detach().double()
                pick = torch.linspace(0, w_u.shape[0] - 1, 96).round().long().unique()
                w = w_u[pick] @ w_v
                q_u, q_v = gptq_low_rank_codes(w_u, w_v, gram, grid, rows=pick)
                gptq = q_u.dequantized @ q_v.dequantized
                q_u, q_v = gptq_low_rank_codes(w_u, w_v, gram, grid, rows=pick, rebase=False)
                plain = q_u.dequantized @ q_v.dequantized
                rtn = rtn_codes(w_u[pick], Grid(4, 32)).dequantized @ rtn_codes(w_v, Grid(4, 32)).dequantized
                kind = f"pair, rank {module.rank}"
            else:
                w = module.weight.detach().double()
                w = w[torch.linspace(0, w.shape[0] - 1, 96).round().long().unique()]
                gptq, rtn = gptq_codes(w, gram, grid).dequantized, rtn_codes(w, Grid(4, 32)).dequantized
                plain = gptq
                kind = "dense"
            norm = output_error(w, torch.zeros_like(w), gram)
            row = {"layer": i, "linear": name, "kind": kind, "gptq": output_error(w, gptq, gram) / norm,
                   "gptq, factors as factorized": output_error(w, plain, gram) / norm,
                   "rtn": output_error(w, rtn, gram) / norm}
            rows.append(row)
            for key in ("gptq", "gptq, factors as factorized", "rtn"):
                errors.setdefault(kind.split(",")[0], {}).setdefault(key, []).append(row[key])
                errors.setdefault("all", {}).setdefault(key, []).append(row[key])
            print(row, flush=True)
    summary = {k: {m: math.exp(sum(map(math.log, e)) / len(e)) for m, e in by.items()} | {"matrices": len(by["gptq"])}
               for k, by in errors.items()}
    print(summary)
    result = {"model": model_dir, "calibration": {"dataset": "wikitext2", "nsamples": nsamples, "seqlen": seqlen,
              "seed": 0}, "layers": LAYERS, "rows_per_matrix": 96, "group_size": 32, "bits": 4,
              "geomean_relative_error": summary, "matrices": rows, "wall_s": time.perf_counter() - t0}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
