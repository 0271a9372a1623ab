"""Two saved svdllm models compared tensor by tensor: same keys and ranks, bit-identical or not, the largest
relative difference of any saved tensor and of any low-rank product W_u·W_v (the factors themselves may differ by
the sign of a singular vector where the products agree).
Usage: python benchmarks/common/compare_models.py MODEL_A MODEL_B OUT.json"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))


def compare(dir_a: Path, dir_b: Path) -> dict:
    a, b = tensors(dir_a), tensors(dir_b)
    ma, mb = (json.loads((d / "svdllm_manifest.json").read_text()) for d in (dir_a, dir_b))
    common = sorted(a.keys() & b.keys())
    products = {}
    for k in common:  # <prefix>.u.weight (m × r) and <prefix>.v.weight (r × n)
        if k.endswith(".u.weight") and k[:-8] + "v.weight" in a:
            v = k[:-8] + "v.weight"
            if a[k].shape == b[k].shape:
                products[k[:-9]] = relative(a[k].double() @ a[v].double(), b[k].double() @ b[v].double())
    worst = max(products, key=products.get) if products else None
    return {"a": str(dir_a), "b": str(dir_b), "same_keys": a.keys() == b.keys(), "same_ranks": ma["ranks"] == mb["ranks"],
            "ranks_differing": sum(ma["ranks"].get(k) != mb["ranks"].get(k) for k in ma["ranks"]),
            "params": [ma["params"]["model_after"], mb["params"]["model_after"]],
            "bit_identical": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in common),
            "max_relative_difference": max((relative(a[k], b[k]) for k in common if a[k].shape == b[k].shape),
                                           default=None),
            "max_relative_difference_products": products[worst] if worst else None, "worst_product": worst}


if __name__ == "__main__":
    result = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    Path(sys.argv[3]).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
