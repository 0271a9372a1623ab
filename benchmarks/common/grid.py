"""Compress SmolLM2-135M with several (method, allocator, update) configurations and evaluate each ratio by the
protocol. Resumable: a finished compression or evaluation (its JSON exists) is skipped, so an interrupted grid
picks up where it stopped. Calibration statistics are cached, so every configuration after the first reuses the
one calibration pass (the closed-form update alone needs a pass of its own per ratio).

Usage:
  python benchmarks/common/grid.py OUT --configs svd-llm:global,svd-llm:v2 --ratios 0.4,0.6,0.2 [--max-windows N]
A configuration is METHOD[:ALLOC[:UPDATE]] (default alloc uniform, update none). Runs go ratio-major in the order
given, so the ratios that matter most finish first; each model is evaluated as soon as it is compressed. Render
with benchmarks/common/grid_table.py OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_json(cmd: list[str], dest: Path, log: Path) -> dict:
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, dest)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--configs", required=True)
    p.add_argument("--ratios", default="0.2,0.4,0.6")
    p.add_argument("--compress-ratios", default="0.2,0.4,0.6", help="ratios each compression writes (one pass)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--extra", default="", help="extra arguments for `svdllm compress`")
    p.add_argument("--compress-only", action="store_true", help="compress every configuration, evaluate nothing")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "grid.log"
    svdllm = [sys.executable, "-m", "svdllm.cli"]
    ratios = args.ratios.split(",")
    configs = []
    for spec in args.configs.split(","):
        parts = spec.split(":")
        method, alloc, update = parts[0], (parts[1:2] or ["uniform"])[0], (parts[2:3] or ["none"])[0]
        configs.append((method, alloc, update))
    tag = f"-w{args.max_windows}" if args.max_windows else ""
    def model_dir(method: str, alloc: str, update: str, r: str) -> Path:
        """The configuration's model at ratio r, compressed first if it is not there yet."""
        name = f"{method}-{alloc}-{update}"
        # the closed-form update runs one calibration pass per ratio: one process per ratio, so an interrupted grid
        # keeps the ratios already done (and the pass itself resumes after its last finished layer)
        sequential = update.startswith("closed-form")
        rs, suffix = ([r], f"-r{float(r):g}") if sequential else (args.compress_ratios.split(","), "")
        dest = out / f"compress-{name}{suffix}.json"
        if not (dest.exists() and all((out / name / f"ratio-{float(x):g}").is_dir() for x in rs)):
            # a single ratio is saved at --out itself, several under --out/ratio-R
            target = out / name / f"ratio-{float(r):g}" if len(rs) == 1 else out / name
            cmd = svdllm + ["compress", "--model", args.model, "--method", method, "--alloc", alloc, "--update", update,
                            "--ratio", ",".join(rs), "--out", str(target), "--overwrite", "--json",
                            "-q"] + args.extra.split()
            run_json(cmd, dest, log)
        return out / name / f"ratio-{float(r):g}"

    for r in ratios:  # ratio-major, each model evaluated as soon as it exists
        for method, alloc, update in configs:
            name = f"{method}-{alloc}-{update}"
            dest = out / f"eval-{name}-r{r}{tag}.json"
            if dest.exists():
                continue
            if args.compress_only:
                model_dir(method, alloc, update, r)
                continue
            cmd = svdllm + ["eval", "--model", str(model_dir(method, alloc, update, r)), "--ppl", "wikitext2",
                            "--json", "-q"] + (["--max-windows", str(args.max_windows)] if args.max_windows else [])
            res = run_json(cmd, dest, log)
            print(f"{name} R={r}: {res['ppl']['wikitext2']['ppl']:.2f}", flush=True)


if __name__ == "__main__":
    main()
