"""`svdllm report RUN_DIR`: where the ranks went, as a table and a plot, read from the manifest alone."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import SvdllmError
from .io.checkpoint import MANIFEST_NAME as MANIFEST


def _run_dirs(run_dir: Path) -> list[Path]:
    if (run_dir / MANIFEST).exists():
        return [run_dir]
    subs = sorted(p for p in run_dir.glob("*/") if (p / MANIFEST).exists())
    if not subs:
        raise SvdllmError(f"{run_dir} holds no {MANIFEST}: give a directory written by `svdllm compress`.")
    return subs


def kept_fractions(manifest: dict) -> dict[str, dict[int, float]]:
    """matrix type -> layer -> kept rank fraction r / min(m, n) (1 for a matrix left dense)."""
    table: dict[str, dict[int, float]] = {}
    for name, rank in manifest["ranks"].items():
        m, n = manifest["shapes"][name]
        parts = name.split(".")
        layer, kind = int(parts[2]), parts[-1]
        table.setdefault(kind, {})[layer] = 1.0 if rank is None else rank / min(m, n)
    return table


def report(run_dir: str | os.PathLike, png: str | os.PathLike | None = None) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SvdllmError(f"{run_dir} is not a directory; give the --out of a `svdllm compress` run.")
    runs = []
    for d in _run_dirs(run_dir):
        manifest = json.loads((d / MANIFEST).read_text())
        table = kept_fractions(manifest)
        kinds = list(table)
        layers = sorted({layer for col in table.values() for layer in col})
        p = manifest["params"]
        print(f"{d}: method {manifest['method']}, alloc {manifest.get('alloc', 'uniform')}, ratio "
              f"{manifest['ratio']} (achieved {100 * p['achieved_ratio']:.2f}%), parameters "
              f"{p['model_before']:,} → {p['model_after']:,}")
        print("kept rank fraction r/min(m,n) per layer (1.00 = dense)")
        print("layer " + " ".join(f"{k:>9s}" for k in kinds))
        for layer in layers:
            print(f"{layer:5d} " + " ".join(f"{table[k].get(layer, float('nan')):9.2f}" for k in kinds))
        runs.append({"dir": str(d), "method": manifest["method"], "alloc": manifest.get("alloc"),
                     "ratio": manifest["ratio"], "kept_fraction": table})
    out = Path(png) if png else run_dir / "ranks.png"
    _plot(runs, out)
    print(f"plot written to {out}")
    return {"command": "report", "runs": runs, "png": str(out)}


def _plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False, sharey=True)
    for ax, run in zip(axes[0], runs):
        for kind, col in run["kept_fraction"].items():
            layers = sorted(col)
            ax.plot(layers, [col[i] for i in layers], marker=".", label=kind)
        ax.set_title(f"{run['method']} / {run['alloc']} / R={run['ratio']:g}")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("kept rank fraction r / min(m, n)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
