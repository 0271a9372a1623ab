"""The models of two same_models_refactor.sh runs compared configuration by configuration: every saved safetensors
tensor (same key set, same dtype and shape, torch.equal on every key) and the ranks of svdllm_manifest.json.
Where they are not bit-identical: the largest relative difference max|a - b| / max|a| over all tensors, the tensors
that differ (worst first), and for low-rank layers the largest relative difference of the products W_u·W_v (the
factors may differ by the sign of a singular vector where the products agree). The tensors are read and compared by
benchmarks/common/compare_models.py's functions.

Usage: python benchmarks/reliability/same_models_compare.py BEFORE_DIR AFTER_DIR OUT.json
  ONLY=name[,name...]  compares only these configurations (default: the five of same_models_refactor.sh)
Writes OUT.json ({"rows": [one per configuration], "all_bit_identical": ...}), prints a table; exit status 0 only
if every configuration compared is bit-identical with the same ranks (1 otherwise, 2 on a usage error).
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from compare_models import relative, tensors  # noqa: E402 (benchmarks/common/compare_models.py)

CONFIGS = ["default-r0.4", "default-r0.6", "joint-int4", "layerwise-r0.4", "torchrun-r0.4"]
# manifest entries that are expected to differ from one run to the next (times, paths, dates, versions)
VOLATILE = {"timings", "created", "date", "out", "svdllm_version", "version", "host", "wall_s", "peak_rss_mb"}


def product_differences(a: dict, b: dict, common: list[str]) -> dict[str, float]:
    """Relative difference of W_u·W_v per low-rank layer (<prefix>.u.weight m × r, <prefix>.v.weight r × n), where
    both sides store them as floating-point matrices of the same shapes (not for packed quantized factors)."""
    out = {}
    for k in common:
        if not k.endswith(".u.weight"):
            continue
        v = k[: -len("u.weight")] + "v.weight"
        if v not in a or v not in b:
            continue
        ua, va, ub, vb = a[k], a[v], b[k], b[v]
        if not all(t.is_floating_point() and t.dim() == 2 for t in (ua, va, ub, vb)):
            continue
        if ua.shape != ub.shape or va.shape != vb.shape or ua.shape[1] != va.shape[0]:
            continue
        out[k[: -len(".u.weight")]] = relative(ua.double() @ va.double(), ub.double() @ vb.double())
    return out


def manifest_differences(ma: dict, mb: dict) -> list[str]:
    """Top-level manifest entries (other than ranks and the volatile ones) that differ: for information."""
    keys = (ma.keys() | mb.keys()) - VOLATILE - {"ranks"}
    return sorted(k for k in keys if ma.get(k) != mb.get(k))


def compare(dir_a: Path, dir_b: Path) -> dict:
    a, b = tensors(dir_a), tensors(dir_b)
    ma, mb = (json.loads((d / "svdllm_manifest.json").read_text()) for d in (dir_a, dir_b))
    common = sorted(a.keys() & b.keys())
    differing = {}
    for k in common:
        ta, tb = a[k], b[k]
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            differing[k] = {"dtype": [str(ta.dtype), str(tb.dtype)], "shape": [list(ta.shape), list(tb.shape)],
                            "relative_difference": None}
        elif not torch.equal(ta, tb):
            differing[k] = {"dtype": str(ta.dtype), "shape": list(ta.shape), "relative_difference": relative(ta, tb),
                            "elements_differing": int((ta != tb).sum()), "elements": ta.numel()}
    ra, rb = ma.get("ranks", {}), mb.get("ranks", {})
    products = product_differences(a, b, common)
    worst_product = max(products, key=products.get) if products else None
    rel = [d["relative_difference"] for d in differing.values() if d["relative_difference"] is not None]
    same_keys = a.keys() == b.keys()
    return {
        "same_keys": same_keys,
        "only_before": sorted(a.keys() - b.keys()), "only_after": sorted(b.keys() - a.keys()),
        "tensors": [len(a), len(b)],
        "same_ranks": ra == rb,
        "ranks_differing": sorted(k for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k)),
        "bit_identical": same_keys and not differing and len(a) > 0,
        "tensors_differing": len(differing),
        "max_relative_difference": max(rel, default=0.0 if not differing else None),
        "max_relative_difference_products": products[worst_product] if worst_product else None,
        "worst_product": worst_product,
        "differing": dict(sorted(differing.items(), key=lambda kv: -(kv[1]["relative_difference"] or float("inf")))),
        "params_after": [ma.get("params", {}).get("model_after"), mb.get("params", {}).get("model_after")],
        "manifest_entries_differing": manifest_differences(ma, mb),
    }


def main(before: Path, after: Path, out: Path) -> int:
    names = [n for n in os.environ.get("ONLY", "").split(",") if n] or CONFIGS
    rows = []
    for name in names:
        row = {"config": name, "before": str(before / name), "after": str(after / name)}
        missing = [str(d / name) for d in (before, after) if not (d / name / "svdllm_manifest.json").is_file()]
        if missing:
            row |= {"error": f"no model (svdllm_manifest.json) in {', '.join(missing)}", "bit_identical": False,
                    "same_ranks": False}
        else:
            row |= compare(before / name, after / name)
        for side, d in (("before", before), ("after", after)):  # the run's own record of its code
            env = d / f"{name}.env"
            if env.is_file():
                row[f"{side}_env"] = dict(line.split("=", 1) for line in env.read_text().splitlines()
                                          if "=" in line and line.split("=", 1)[0] in ("src", "src_git", "src_py_sha256"))
        rows.append(row)
    ok = all(r["bit_identical"] and r["same_ranks"] for r in rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"before": str(before), "after": str(after), "all_bit_identical": ok, "rows": rows},
                              indent=1) + "\n")
    print(f"{'config':16} {'bit-identical':>13} {'same ranks':>10} {'tensors differing':>17} {'max rel diff':>12} "
          f"{'max rel diff W_u·W_v':>20}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:16} ERROR: {r['error']}")
            continue
        mr, mp = r["max_relative_difference"], r["max_relative_difference_products"]
        print(f"{r['config']:16} {str(r['bit_identical']):>13} {str(r['same_ranks']):>10} "
              f"{r['tensors_differing']:>8} of {r['tensors'][0]:<6} {'-' if mr is None else f'{mr:.3g}':>12} "
              f"{'-' if mp is None else f'{mp:.3g}':>20}")
    print(("ALL BIT-IDENTICAL" if ok else "NOT ALL BIT-IDENTICAL") + f" -> {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
