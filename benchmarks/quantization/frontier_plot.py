"""The frontier's table (OUT/frontier.md), its rows as numbers (OUT/frontier.json) and picture (OUT/frontier.png)
from frontier_smollm2.sh's raw results; and, for that script, the ratio R at a dense model's bytes.

x: bytes of the decoder layers' linears as stored (`linear_bytes` of `svdllm quantize` / `compress --bits`; float32
models: 4 bytes per parameter of those linears); y: WikiText-2 perplexity, all 148 windows.
Usage: python benchmarks/quantization/frontier_plot.py OUT_DIR BEST_RESULTS_DIR
       python benchmarks/quantization/frontier_plot.py --budget OUT_DIR SCHEME...   (R of each dense SCHEME's bytes, comma-joined)
"""
import json
import math
import sys
from pathlib import Path


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def budget_ratio(out: Path, scheme: str) -> str:
    """R (the fraction of the linears' float32 bytes removed) that leaves the bytes of the dense model quantized at
    `scheme` (its round-to-nearest run: GPTQ stores the same bytes), rounded up: never more bytes than it."""
    q = json.loads((out / f"quantize-dense-{scheme}-rtn.json").read_text())
    return f"{math.ceil((1 - q['linear_bytes'] / (4 * q['quantized_weights'])) * 1e4) / 1e4:g}"


def rows(out: Path, best: Path) -> list[dict]:
    found = []

    def add(series, label, bytes_, eval_, float_label=None):
        """float_label: the float32 row of the same model, for the cost of quantizing it"""
        if bytes_ is not None and eval_ is not None:
            found.append({"series": series, "label": label, "bytes": bytes_, "float": float_label,
                          "ppl": eval_["ppl"]["wikitext2"]["ppl"], "windows": eval_["ppl"]["wikitext2"]["windows"]})

    dense_q = _json(out / "quantize-dense-int4-gptq.json")
    if dense_q:
        add("dense", "dense float32", 4 * dense_q["quantized_weights"], _json(out / "eval-dense-float.json"))
    for method in ("rtn", "gptq"):
        for scheme in ("int8", "int4", "int3"):
            q = _json(out / f"quantize-dense-{scheme}-{method}.json")
            add(f"dense {method}", f"dense {scheme} {method}", q and q["linear_bytes"],
                _json(out / f"eval-dense-{scheme}-{method}.json"), "dense float32")
    for r in ("0.2", "0.4", "0.6"):
        # the model quantized below is the one in best_smollm2's model directory: where a rebuild on another CPU
        # moved ranks (manifest-best-rebuild-r*.json), that rebuild, scored as itself
        rebuilt = (best / f"manifest-best-rebuild-r{r}.json").exists()
        compress = _json(best / ("compress-best-rebuild.json" if rebuilt else "compress-best.json"))
        kept = next((x["linear_kept"] for x in (compress or {}).get("results", []) if f"{x['ratio']:g}" == r), None)
        add("default float32", f"default R = {r} float32", kept and 4 * kept,
            _json(best / f"eval-best-{'rebuild-' if rebuilt else ''}r{r}.json"))
        for scheme in ("int8", "int4"):
            q = _json(out / f"quantize-default-r{r}-{scheme}.json")
            add(f"default {scheme}", f"default R = {r} {scheme} gptq", q and q["linear_bytes"],
                _json(out / f"eval-default-r{r}-{scheme}.json"), f"default R = {r} float32")
    paper = _json(out / "compress-paper-r0.4.json")
    kept = paper and paper["results"][0]["linear_kept"]
    add("SVD-LLM", "SVD-LLM R = 0.4 float32", kept and 4 * kept, _json(out / "eval-paper-r0.4-float.json"))
    q = _json(out / "quantize-paper-r0.4-int4.json")
    add("SVD-LLM", "SVD-LLM R = 0.4 int4 gptq", q and q["linear_bytes"], _json(out / "eval-paper-r0.4-int4.json"),
        "SVD-LLM R = 0.4 float32")
    for path in sorted(out.glob("compress-rank-only-r*.json")):
        res = _json(path)["results"][0]
        r = f"{res['ratio']:g}"
        add("default float32", f"default R = {r} float32 (rank only)", 4 * res["linear_kept"],
            _json(out / f"eval-rank-only-r{r}.json"))
    # the joint runs' budgets, named by the dense model whose bytes they are (frontier_smollm2.sh's `joint`)
    budget = {budget_ratio(out, scheme): scheme for scheme in ("int8", "int4", "int3")
              if (out / f"quantize-dense-{scheme}-rtn.json").exists()}
    joint = _json(out / "compress-joint.json")
    for res in (joint or {}).get("results", []):
        r = f"{res['ratio']:g}"
        # a budget compressed again on its own (`compress --ratio R --bits 3,4,8`, after a fix) replaces its entry
        res = (_json(out / f"compress-joint-r{r}.json") or {"results": [res]})["results"][0]
        at = f"at dense {budget[r]}'s bytes" if r in budget else f"R = {r}"
        add("rank and bits", f"rank and bits {at} ({res['bits_per_weight']:.2f} bits per weight)",
            res["linear_bytes"], _json(out / f"eval-joint-r{r}.json"), "dense float32")
    return found


def main(out: Path, best: Path) -> None:
    found = rows(out, best)
    ppl = {row["label"]: row["ppl"] for row in found}
    lines = ["| model | bytes of the decoder linears | WikiText-2 ppl | against its float32 |", "|---|---|---|---|"]
    for row in sorted(found, key=lambda x: (-x["bytes"], x["ppl"])):
        base = ppl.get(row["float"])
        cost = f"{100 * (row['ppl'] / base - 1):+.0f}%".replace("-", "−") if base else ""
        lines.append(f"| {row['label']} | {row['bytes'] / 2**20:.1f} MiB | {row['ppl']:.2f} | {cost} |")
    (out / "frontier.md").write_text("\n".join(lines) + "\n")
    # the rows as numbers: a float32 model's bytes are 4 per parameter of its linears, computed here, not stored
    (out / "frontier.json").write_text(json.dumps([{k: row[k] for k in ("label", "bytes", "ppl", "windows")}
                                                   | {"mib": row["bytes"] / 2**20} for row in found], indent=1) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for series in dict.fromkeys(r["series"] for r in found):
        pts = sorted((r["bytes"] / 2**20, r["ppl"]) for r in found if r["series"] == series)
        ax.plot(*zip(*pts), marker="o", label=series)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):  # plain numbers on the log axes (MiB, perplexity), not powers of ten
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(which="minor", labelsize=7)
    ax.set_xlabel("bytes of the decoder layers' linears (MiB)")
    ax.set_ylabel("WikiText-2 perplexity (148 × 2048 tokens)")
    ax.set_title("SmolLM2-135M: perplexity against memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)


if __name__ == "__main__":
    if sys.argv[1] == "--budget":
        print(",".join(budget_ratio(Path(sys.argv[2]), scheme) for scheme in sys.argv[3:]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
