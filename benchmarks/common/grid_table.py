"""Markdown table of a benchmarks/common/grid.py run: WikiText-2 perplexity per configuration and ratio, with timings.

Usage: python benchmarks/common/grid_table.py OUT [--baseline DIR_WITH_eval-r*.json for svd-llm/uniform/none]
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def main(run: Path) -> None:
    rows: dict[str, dict] = {}
    for path in sorted(run.glob("eval-*.json")):
        m = re.match(r"eval-(.+)-r([0-9.]+?)(-w(\d+))?\.json$", path.name)
        if not m:
            continue
        ev = json.loads(path.read_text())["ppl"]["wikitext2"]
        rows.setdefault(m.group(1), {})[m.group(2)] = ev
    ratios = sorted({r for cols in rows.values() for r in cols}, key=float)
    print("| method | alloc | update | " + " | ".join(f"R={r}" for r in ratios) + " | compression wall time |")
    print("|---|---|---|" + "---|" * len(ratios) + "---|")
    for name, cols in rows.items():
        method, alloc, update = _split(name)
        cells = []
        for r in ratios:
            ev = cols.get(r)
            if ev is None:
                cells.append("–")
                continue
            partial = "" if ev["windows"] == ev["total_windows"] else f" ({ev['windows']}/{ev['total_windows']} windows)"
            cells.append(f"{ev['ppl']:.2f}{partial}")
        walls = []  # one compression for all ratios, or (closed-form updates) one per ratio
        for comp in [run / f"compress-{name}.json"] + [run / f"compress-{name}-r{r}.json" for r in ratios]:
            if comp.exists():
                c = json.loads(comp.read_text())
                t = c["results"][0]
                per = f"R={t['ratio']:g}: " if comp.stem.endswith(f"-r{t['ratio']:g}") else ""
                walls.append(f"{per}{c['wall_s']:.0f} s (calibration {t.get('calibration_s', 0):.0f}, gradients "
                             f"{t.get('gradient_pass_s', 0):.0f}, spectra {t.get('spectra_s', 0):.0f}, factorization "
                             f"{t.get('factorization_s', 0):.0f})")
        wall = "; ".join(walls)
        print(f"| {method} | {alloc} | {update} | " + " | ".join(cells) + f" | {wall} |")


def _split(name: str) -> tuple[str, str, str]:
    from svdllm.update import UPDATES

    update = max((u for u in UPDATES if name.endswith(f"-{u}")), key=len, default="none")
    rest = name[: -len(update) - 1]
    method, _, alloc = rest.rpartition("-")
    return method, alloc, update


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/grid"))
