"""`svdllm report RUN_DIR`: where the ranks went (table and plot, from the manifest alone); `svdllm compare RUN_DIR...`:
runs side by side with their evaluation and benchmark results, a markdown table and plots."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import SvdllmError
from ..utils.atomic import atomic_write_text, save_figure
from ..utils.extras import available
from ..io.checkpoint import MANIFEST_NAME as MANIFEST


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
    if not available("matplotlib"):
        print("no plot: matplotlib is not installed (pip install 'svdllm[plots]')")
        return {"command": "report", "runs": runs, "png": None}
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
    save_figure(fig, out)


def _first(d: dict, name: str):
    """The full-set result for `name` if there is one, else a partial one (its key says how partial)."""
    if name in d:
        return name, d[name]
    partial = sorted(k for k in d if k.startswith(name + "["))
    return (partial[0], d[partial[0]]) if partial else (None, None)


def _row(source: str, made: dict | None, params, ev: dict) -> dict:
    """One model's line: how it was made (None: the dense model, drawn as the reference) and its results."""
    row = {"dir": source, "method": made["method"] if made else "dense", "alloc": made["alloc"] if made else "–",
           "update": made["update"] if made else "–", "ratio": made["ratio"] if made else 0.0,
           "achieved": made["achieved"] if made else 0.0, "params": params, "ppl": {}}
    for ds in ("wikitext2", "ptb", "c4"):
        key, r = _first(ev.get("ppl", {}), ds)
        if r:
            row["ppl"][ds] = {"ppl": r["ppl"], "key": key}
    zkey, z = _first(ev, "zero_shot")
    if z:
        row["zero_shot"] = {"average_acc": z["average_acc"], "key": zkey,
                            "tasks": {t: r["acc"] for t, r in z["tasks"].items() if "acc" in r}}
    return row


def _looks_like_a_path(model: str) -> bool:
    """A local directory rather than a built-in name or a hub id ("org/name")."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).name.startswith("ratio-")


def _json_rows(files: list[Path]) -> list[dict]:
    """Rows from `svdllm eval --json` outputs, one per model: files of the same model (one perplexity set or task
    each, as long runs are split) merge into one row."""
    from .zeroshot import combine
    from ..io.results import how_made, ppl_key, zero_shot_key

    models: dict[str, dict] = {}
    for f in files:
        try:
            d = json.loads(f.read_text().strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise SvdllmError(f"{f} is not the JSON of `svdllm eval --json` ({e}).") from e
        if d.get("command") != "eval":
            raise SvdllmError(f"{f} is not the output of `svdllm eval --json` (its command is {d.get('command')!r}).")
        m = models.setdefault(d["model"], {"made": None, "params": None, "ev": {"ppl": {}}})
        if "compressed" in d:
            m["made"], m["params"] = d["compressed"], d.get("params")
        elif (Path(d["model"]) / MANIFEST).is_file():  # written before eval recorded it: read the model's manifest
            m["made"] = how_made(json.loads((Path(d["model"]) / MANIFEST).read_text()))
        elif _looks_like_a_path(d["model"]):
            raise SvdllmError(f"{f} scores {d['model']}, which is not here and the file does not say how it was "
                              "compressed: recreate that directory (the command that compressed it) or evaluate "
                              "again with this version of svdllm, which records it.")
        m["ev"]["ppl"].update({ppl_key(ds, r): r for ds, r in d.get("ppl", {}).items()})
        if d.get("zero_shot"):
            zs = d["zero_shot"]
            tag = zero_shot_key(zs.get("limit"))
            m["ev"][tag] = combine(m["ev"].get(tag), zs)
    for m in models.values():  # a model with a task still partial is shown as partial, as in svdllm_eval.json
        for tag in [k for k in m["ev"] if k.startswith("zero_shot") and not m["ev"][k].get("complete", True)]:
            m["ev"][zero_shot_key(m["ev"][tag].get("limit"), complete=False)] = m["ev"].pop(tag)
    rows = []
    for name, m in models.items():
        params = m["params"] if m["params"] is not None else (m["made"] or {}).get("params")
        rows.append(_row(name, m["made"], params, m["ev"]))
    return rows


def compare(run_dirs: list[str | os.PathLike], out: str | os.PathLike = "compare") -> dict:
    """Runs side by side, a markdown table and PNG plots. Each input is a directory written by `svdllm compress`
    (its manifest, svdllm_eval.json and svdllm_bench.json) or a JSON file written by `svdllm eval --json`
    (dense models too: they are drawn as the reference line)."""
    from ..io.results import BENCH_NAME, EVAL_NAME, how_made, read_results

    rows, files = [], []
    for rd in run_dirs:
        rd = Path(rd)
        if rd.is_file() and rd.suffix == ".json":
            files.append(rd)
            continue
        if not rd.is_dir():
            raise SvdllmError(f"{rd} is neither a directory written by `svdllm compress` nor a JSON file written by "
                              "`svdllm eval --json`.")
        for d in _run_dirs(rd):
            m = json.loads((d / MANIFEST).read_text())
            row = _row(str(d), how_made(m), m["params"]["model_after"], read_results(d, EVAL_NAME))
            be = read_results(d, BENCH_NAME)
            if be.get("result", {}).get("rows"):
                row["bench"] = be["result"]["rows"]
                if be.get("dense", {}).get("rows"):
                    row["bench_dense"], row["bench_dense_model"] = be["dense"]["rows"], be["dense"]["model"]
            rows.append(row)
    rows += _json_rows(files)
    rows.sort(key=lambda r: (r["method"] != "dense", r["method"], r["alloc"], r["update"], r["ratio"]))
    datasets = [ds for ds in ("wikitext2", "ptb", "c4") if any(ds in r["ppl"] for r in rows)]
    cols = ["method", "alloc", "update", "R", "parameters"] + [f"{ds} ppl" for ds in datasets] + \
        ["zero-shot avg acc", "prefill × (b=1)", "decode × (b=1)"]
    header = "| " + " | ".join(cols) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        cells = [f"{r['ppl'][ds]['ppl']:.2f}" + ("" if r["ppl"][ds]["key"] == ds else f" {r['ppl'][ds]['key'][len(ds):]}")
                 if ds in r["ppl"] else "–" for ds in datasets]
        z = r.get("zero_shot")
        zs = "–" if not z else f"{z['average_acc']:.4f} ({len(z['tasks'])} tasks)" + \
            ("" if z["key"] == "zero_shot" else f" {z['key'][9:]}")
        b1 = next((b for b in r.get("bench", []) if b["batch"] == min(x["batch"] for x in r["bench"])), None)
        pf = f"{b1['prefill_speedup']:.2f}" if b1 and "prefill_speedup" in b1 else "–"
        dc = f"{b1['decode_speedup']:.2f}" if b1 and "decode_speedup" in b1 else "–"
        params = f"{r['params']:,}" if r["params"] is not None else "–"
        ratio = "dense" if r["method"] == "dense" else f"{r['ratio']:g}"
        cells = [r["method"], r["alloc"], r["update"], ratio, params] + cells + [zs, pf, dc]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table_path = out / "compare.md"

    atomic_write_text(table_path, table + "\n")
    plots = available("matplotlib")
    pngs = _compare_plots(rows, out) if plots else []
    if not plots:
        print("no plots: matplotlib is not installed (pip install 'svdllm[plots]')")
    for p in pngs:
        print(f"plot written to {p}")
    return {"command": "compare", "rows": rows, "table": str(table_path), "png": [str(p) for p in pngs]}


def _compare_plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    datasets = [ds for ds in ("wikitext2", "ptb", "c4") if any(ds in r["ppl"] for r in rows)]
    if datasets:
        fig = _against_ratio(plt, rows, datasets, lambda r, ds: r["ppl"].get(ds, {}).get("ppl"), "perplexity")
        for ax in fig.axes:
            ax.set_yscale("log")
        written.append(save_figure(fig, out / "ppl_vs_ratio.png"))
    tasks = sorted({t for r in rows for t in r.get("zero_shot", {}).get("tasks", {})})
    if tasks:
        from .zeroshot import CHANCE

        # the average panel compares like with like: only the tasks every row has (all of them once a run is done)
        common = [t for t in tasks if all(t in r["zero_shot"]["tasks"] for r in rows if r.get("zero_shot"))]
        average = "average" if common == tasks else f"average of the {len(common)} tasks all have"

        def acc(r, t):
            z = r.get("zero_shot")
            if not z or (t == average and not common):
                return None
            return sum(z["tasks"][x] for x in common) / len(common) if t == average else z["tasks"].get(t)

        def chance(t):
            if t != average:
                return CHANCE.get(t)
            return sum(CHANCE[x] for x in common) / len(common) if common and all(x in CHANCE for x in common) else None

        written.append(save_figure(_against_ratio(plt, rows, tasks + [average], acc, "zero-shot accuracy", chance),
                                   out / "zero_shot_vs_ratio.png"))
    benched = [r for r in rows if r.get("bench")]
    for axis, other, name in (("batch", "prompt_len", "batch"), ("prompt_len", "batch", "seqlen")):
        if benched and len({b[axis] for r in benched for b in r["bench"]}) > 1:
            written.append(save_figure(_throughput_figure(plt, benched, axis, other), out / f"throughput_vs_{name}.png"))
    return written


def _against_ratio(plt, rows: list[dict], panels: list[str], value, ylabel: str, floor=None):
    """One panel per dataset or task: a line per method / allocator / update over the compression ratio, each
    dense model as a dashed reference line, and `floor(panel)` (chance accuracy) dotted where it is known."""
    cols = min(len(panels), 4)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.3 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        series: dict[str, list] = {}
        for r in rows:
            v = value(r, panel)
            if v is None:
                continue
            if r["method"] == "dense":
                ax.axhline(v, color="black", ls="--", lw=1, label=f"dense ({Path(r['dir']).name})")
            else:
                series.setdefault(f"{r['method']} / {r['alloc']} / {r['update']}", []).append((r["ratio"], v))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if floor is not None and floor(panel) is not None:
            ax.axhline(floor(panel), color="grey", ls=":", lw=1, label="chance (1 / choices)")
        ax.set_title(panel)
        ax.set_xlabel("compression ratio R")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _throughput_figure(plt, benched: list[dict], axis: str, other: str):
    """Tokens/s and peak memory against `axis` (batch size or prompt length) at the largest value of `other`, as
    in the SVD-LLM paper's Figure 3: absolute numbers, so the dense model measured in the same run is drawn too."""
    keys = (("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s"), ("peak_mem_mb", "peak memory (MB)"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))

    def curve(bench_rows):
        fixed = max(b[other] for b in bench_rows)
        return sorted(((b[axis], b) for b in bench_rows if b[other] == fixed), key=lambda t: t[0])

    xs = sorted({b[axis] for r in benched for b in r["bench"]})
    dense_drawn = set()
    for r in benched:
        series = [(f"{r['method']} / {r['alloc']} / R={r['ratio']:g}", curve(r["bench"]), {})]
        dense = r.get("bench_dense")
        if dense and r["bench_dense_model"] not in dense_drawn:
            dense_drawn.add(r["bench_dense_model"])
            series.append((f"dense ({r['bench_dense_model']})", curve(dense), {"color": "black", "ls": "--"}))
        for label, pts, style in series:
            for ax, (key, _) in zip(axes, keys):
                xy = [(x, b[key]) for x, b in pts if b.get(key) is not None]
                if xy:
                    ax.plot(*zip(*xy), marker="o", label=label, **style)
    for ax, (_, ylabel) in zip(axes, keys):
        ax.set_xlabel("batch size" if axis == "batch" else "prompt length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(alpha=0.3)
    fixed_name = "prompt length" if other == "prompt_len" else "batch size"
    fig.suptitle(f"at the largest {fixed_name} measured")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    return fig
