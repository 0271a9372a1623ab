"""Render the tables of BENCHMARKS.md's deployment section from the JSON that deploy_smollm2.sh wrote.

Next to every measured speedup stands the FLOP ratio it is bounded by: the matrix-multiply FLOPs per token of the
compressed model over the dense one, counting the decoder's linears (from the parameter counts), the LM head (all
positions in a prefill, as `bench` runs it) and the attention products (QKᵀ and AV over the causal prefix).

Usage: python benchmarks/speed/deploy_table.py runs/deploy [--protocol benchmarks/results/protocol_smollm2]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None


def model_config(run: Path, bench: dict) -> dict:
    """The compressed model's config.json (its directory), or the copy kept beside results moved elsewhere."""
    path = Path(bench["model"]) / "config.json"
    return json.loads((path if path.is_file() else run / "config.json").read_text())


def flops_per_token(params: int, cfg: dict, context: float) -> float:
    d, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    attn_dim = cfg["num_attention_heads"] * cfg.get("head_dim", d // cfg["num_attention_heads"])
    norms = (2 * layers + 1) * d
    linears = params - vocab * d * (1 if cfg.get("tie_word_embeddings", True) else 2) - norms
    return 2 * linears + 2 * vocab * d + layers * 2 * 2 * context * attn_dim


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--protocol", default="benchmarks/results/protocol_smollm2",
                   help="unquantized perplexities of the same models (the protocol's svd-llm uniform run)")
    args = p.parse_args()
    run = Path(args.run)
    ratios = ["0.2", "0.4", "0.6"]

    print("| R | params × | batch × prompt | prefill tok/s dense → compressed | prefill × | FLOP bound | "
          "decode tok/s dense → compressed | decode × | FLOP bound | peak memory × |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    kv_rows = []
    for r in ratios:
        b = load(run / f"bench-{r}.json")
        if not b:
            continue
        cfg = model_config(run, b)
        dense, res = b["dense"], b["result"]
        for row, drow in zip(res["rows"], dense["rows"]):
            n, t = row["prompt_len"], row["new_tokens"]
            pre = flops_per_token(dense["params"], cfg, (n + 1) / 2) / flops_per_token(res["params"], cfg, (n + 1) / 2)
            dec = flops_per_token(dense["params"], cfg, n + t / 2) / flops_per_token(res["params"], cfg, n + t / 2)
            print(f"| {r} | {res['params_ratio']:.3f} | {row['batch']} × {n} | {drow['prefill_tok_s']:.0f} → "
                  f"{row['prefill_tok_s']:.0f} | **{row['prefill_speedup']:.2f}** | {pre:.2f} | "
                  f"{drow['decode_tok_s']:.1f} → {row['decode_tok_s']:.1f} | **{row['decode_speedup']:.2f}** | "
                  f"{dec:.2f} | {row.get('peak_mem_ratio', float('nan')):.2f} |")
        for k in res.get("kv_cache", []):
            kv_rows.append((r, k))
    if kv_rows:
        print("\n| R | tokens | dynamic cache (MiB) | low-rank cache (MiB) | low-rank / dynamic |")
        print("|---|---|---|---|---|")
        for r, k in kv_rows:
            print(f"| {r} | {k['tokens']} | {k['dynamic_bytes'] / 2**20:.1f} | {k['low_rank_bytes'] / 2**20:.1f} | "
                  f"{k['low_rank_ratio']:.3f} |")

    bench = load(run / "bench-0.4.json") or load(run / "bench-0.2.json")
    if not bench:
        return
    dense_disk = bench["dense"]["disk_bytes"]
    cfg = model_config(run, bench)
    embedding = cfg["vocab_size"] * cfg["hidden_size"]
    norms = (2 * cfg["num_hidden_layers"] + 1) * cfg["hidden_size"]
    proto = Path(args.protocol)
    fp32 = {"dense": load(proto / "eval-dense.json"), **{f"svd-llm-{r}": load(proto / f"eval-r{r}.json") for r in ratios}}
    print("\n| model | decoder linears | bits per weight (in memory) | linears MiB | MiB on disk | × dense | "
          "WikiText-2 ppl |")
    print("|---|---|---|---|---|---|---|")
    for name in ["dense", "svd-llm-0.2", "svd-llm-0.4"]:
        b = bench["dense"] if name == "dense" else (load(run / f"bench-{name.split('-')[-1]}.json") or {}).get("result")
        ev = fp32.get(name)
        if ev and b:
            linears = (b["params"] - embedding - norms) * 4
            print(f"| {name} | float32 | 32 | {linears / 2**20:.1f} | {b['disk_bytes'] / 2**20:.1f} | "
                  f"{b['disk_bytes'] / dense_disk:.3f} | {ev['ppl']['wikitext2']['ppl']:.2f} |")
        for scheme in ["int8", "int4"]:
            q = load(run / (f"quantize-dense-{scheme}.json" if name == "dense"
                            else f"quantize-{name.split('-')[-1]}-{scheme}.json"))
            ev = load(run / f"eval-{name}-{scheme}.json")
            if not q:
                continue
            ppl = f"{ev['ppl']['wikitext2']['ppl']:.2f}" if ev else "not run"
            linears = q["quantized_weights"] * q["bits_per_weight"] / 8
            print(f"| {name} + {scheme} | {scheme} | {q['bits_per_weight']:.2f} ({q['memory_bits_per_weight']:.2f}) | "
                  f"{linears / 2**20:.1f} | {q['bytes_on_disk'] / 2**20:.1f} | {q['bytes_on_disk'] / dense_disk:.3f} | "
                  f"{ppl} |")


if __name__ == "__main__":
    main()
