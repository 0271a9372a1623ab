"""Markdown tables of a benchmarks/evaluation/eval_smollm2.sh run: zero-shot accuracy per task (acc, and acc_norm where
lm-eval reports it, ± stderr) with the papers' average, and WikiText-2 / PTB / C4 perplexity, per model.
A task not yet run shows "–" and is left out of the average, which then says how many tasks it covers. "chance" is
the accuracy of guessing (1 / number of choices). A second table gives each compressed model's acc minus the
dense model's, paired over the same documents (from OUT_DIR/scores), with the paired standard error: the
honest test of whether a gap is more than noise.

Usage: python benchmarks/evaluation/eval_table.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from svdllm.evaluation.zeroshot import CHANCE, paired_difference, read_scores

MODELS = {"dense": "dense", "r0.2": "svd-llm R = 0.2", "r0.4": "svd-llm R = 0.4"}
TASKS = ["openbookqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag", "piqa", "mathqa"]
PAPER_SIX = [t for t in TASKS if t != "arc_challenge"]  # SVD-LLM's Table 1 averages these six


def _pct(value, err) -> str:
    return f"{100 * value:.1f}" + (f" ± {100 * err:.1f}" if err is not None else "")


def main(out: Path) -> None:
    zs = {}
    for name in MODELS:
        for task in TASKS:
            path = out / f"zs-{name}-{task}.json"
            if path.exists():
                zs[name, task] = json.loads(path.read_text())["zero_shot"]["tasks"][task]
    print("| task (examples) | chance | " + " | ".join(MODELS.values()) + " |")
    print("|---|---|" + "---|" * len(MODELS))
    for task in TASKS:
        n = next((zs[m, task].get("n") for m in MODELS if (m, task) in zs), None)
        cells = []
        for m in MODELS:
            r = zs.get((m, task))
            if r is None:
                cells.append("–")
                continue
            cell = "acc " + _pct(r["acc"], r.get("acc_stderr"))
            if "acc_norm" in r:
                cell += "; norm " + _pct(r["acc_norm"], r.get("acc_norm_stderr"))
            cells.append(cell)
        print(f"| {task} ({n if n is not None else '?'}) | {100 * CHANCE[task]:.0f} | " + " | ".join(cells) + " |")
    averages = [("**average acc**, the seven", TASKS), ("average acc, the paper's six (no ARC-c)", PAPER_SIX)]
    common = [t for t in TASKS if all((m, t) in zs for m in MODELS)]
    if common and len(common) < len(TASKS):  # while a run is incomplete: the averages that compare like with like
        averages.append((f"average acc over the {len(common)} tasks every model has", common))
    for label, tasks in averages:
        cells = []
        for m in MODELS:
            accs = [zs[m, t]["acc"] for t in tasks if (m, t) in zs]
            cells.append(f"{100 * sum(accs) / len(accs):.1f}" + ("" if len(accs) == len(tasks) else f" ({len(accs)} tasks)")
                         if accs else "–")
        chance = sum(CHANCE[t] for t in tasks) / len(tasks)
        print(f"| {label} | {100 * chance:.1f} | " + " | ".join(cells) + " |")
    print()
    paired_table(out)
    print()
    print("| model | WikiText-2 | PTB | C4 |")
    print("|---|---|---|---|")
    for m, label in MODELS.items():
        ppl = {}
        for path in [out / f"ppl-{m}.json"] + [out / f"ppl-{m}-{s}.json" for s in ("wikitext2", "ptb", "c4")]:
            if path.exists():
                ppl.update(json.loads(path.read_text())["ppl"])
        if not ppl:
            continue
        cells = []
        for s in ("wikitext2", "ptb", "c4"):
            r = ppl.get(s)
            full = r is not None and r["windows"] == r["total_windows"]
            cells.append("–" if r is None else f"{r['ppl']:.2f}" + ("" if full else f" ({r['windows']}/{r['total_windows']})"))
        print(f"| {label} | " + " | ".join(cells) + " |")


def paired_table(out: Path) -> None:
    """acc of each compressed model minus dense, over the documents both scored, ± the paired stderr; the
    average over tasks has stderr sqrt(sum of the tasks' stderr²) / number of tasks (the tasks are independent)."""
    def scores(m, t):
        path = out / "scores" / m / f"{t}.jsonl"
        return read_scores(path) if path.exists() else None

    rows = {m: {} for m in MODELS if m != "dense"}  # model -> task -> paired difference
    for task in TASKS:
        dense = scores("dense", task)
        for m in rows:
            other = scores(m, task)
            if dense and other:
                rows[m][task] = {**paired_difference(other, dense),
                                 "complete": (out / f"zs-{m}-{task}.json").exists()}
    print("| task | " + " | ".join(f"{MODELS[m]} − dense (acc, paired)" for m in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for task in TASKS:
        cells = []
        for m in rows:
            r = rows[m].get(task)
            cells.append("–" if r is None or r["stderr"] is None else
                         f"{100 * r['diff']:+.1f} ± {100 * r['stderr']:.1f}".replace("-", "−")
                         + ("" if r["complete"] else f" ({r['n']} docs so far)"))
        print(f"| {task} | " + " | ".join(cells) + " |")
    cells = []
    for m in rows:
        done = [r for r in rows[m].values() if r["complete"] and r["stderr"] is not None]
        if not done:
            cells.append("–")
            continue
        mean = sum(r["diff"] for r in done) / len(done)
        se = sum(r["stderr"] ** 2 for r in done) ** 0.5 / len(done)
        cells.append(f"{100 * mean:+.1f} ± {100 * se:.1f}".replace("-", "−") + ("" if len(done) == len(TASKS) else f" ({len(done)} tasks)"))
    print("| average over tasks | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/eval"))
