"""The default's table from benchmarks/methods/best_smollm2.sh's raw results: each ratio's model (parameters, achieved
ratio, update, WikiText-2 perplexity), against SVD-LLM as published on the same protocol, and the rows built from
the same models (the other update, LoRA). Prints markdown and writes it to OUT/table.md.

Usage: python benchmarks/methods/best_table.py [OUT]   (default benchmarks/results/best_smollm2)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None


def _ppl(path: Path) -> str:
    d = _json(path)
    if d is None:
        return "not run"
    r = d["ppl"]["wikitext2"]
    partial = "" if r["windows"] == r["total_windows"] else f" ({r['windows']}/{r['total_windows']} windows)"
    return f"{r['ppl']:.2f}{partial}"


def main(out: Path) -> str:
    compress = _json(out / "compress-best.json")
    paper = {r["ratio"]: r for r in _json(ROOT / "benchmarks/results/protocol_smollm2/compress.json")["results"]}
    rows = ["| R | parameters (achieved R) | update | WikiText-2 ppl | SVD-LLM (`--preset paper`) | "
            "with the other update | + LoRA (`finetune --preset cpu`) |", "|---|---|---|---|---|---|---|"]
    notes = []
    for res in compress["results"]:
        r = res["ratio"]
        manifest = _json(out / f"manifest-best-r{r:g}.json")
        update = manifest["update"]
        other = (f"none: {_ppl(out / f'eval-none-r{r:g}.json')}" if update != "none"
                 else f"closed-form: {_ppl(out / f'eval-closed-form-r{r:g}.json')}")
        svd = _json(ROOT / f"benchmarks/results/protocol_smollm2/eval-r{r:g}.json")["ppl"]["wikitext2"]["ppl"]
        best = _json(out / f"eval-best-r{r:g}.json")
        vs = (f" ({100 * (best['ppl']['wikitext2']['ppl'] / svd - 1):+.0f}%)".replace("-", "−")
              if best else "")
        lora = _ppl(out / f'eval-lora-r{r:g}.json')
        rebuild = _json(out / f"manifest-best-rebuild-r{r:g}.json")
        if rebuild:  # the other rows start from a rebuild whose ranks moved: marked, and the rebuild's own score given
            other, lora = f"{other} †", f"{lora} †"
            notes.append(f"† from R = {r:g}'s rebuild on the other CPU ({rebuild['params']['model_after']:,} "
                         f"parameters), which itself scores {_ppl(out / f'eval-best-rebuild-r{r:g}.json')}.")
        rows.append(f"| {r:g} | {res['model_after']:,} ({res['achieved_ratio']:.4f}) | {update} | "
                    f"**{_ppl(out / f'eval-best-r{r:g}.json')}**{vs} | {svd:.2f} ({paper[r]['model_after']:,}) | "
                    f"{other} | {lora} |")
    t = compress["results"][0]
    wall = (out / "wall.txt").read_text().split("compress-best: ")[1].split(" s")[0] if (out / "wall.txt").is_file() else "?"
    rows += [""] + notes if notes else []
    rows += ["", f"Compression of the three ratios in one run: {wall} s wall (gradient pass "
             f"{t.get('gradient_pass_s', 0):.0f} s, allocation with its measurements {t.get('loss_scale_s', 0):.0f} s, "
             f"R = 0.6's closed-form pass {compress['results'][-1]['total_s']:.0f} s), peak RSS "
             f"{max(r['peak_rss_mb'] for r in compress['results']) / 1024:.2f} GiB."]
    text = "\n".join(rows) + "\n"
    (out / "table.md").write_text(text)
    return text


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks/results/best_smollm2"), end="")
