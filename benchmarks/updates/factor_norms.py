"""How each compressed model splits its components between the two factors: per matrix type, the median over
matrices of the median over components of log10(‖W_u[:, k]‖ / ‖W_v[k, :]‖), and the largest entry of each factor.
The product does not depend on the split, but LoRA's per-element steps and per-channel quantization do.

Usage: python benchmarks/updates/factor_norms.py MODEL_DIR [MODEL_DIR ...]   (directories written by `svdllm compress`)
"""
import collections
import sys

import torch
from safetensors import safe_open


def split_by_type(model_dir: str) -> dict[str, list[tuple[float, float, float]]]:
    rows = collections.defaultdict(list)
    with safe_open(f"{model_dir}/model.safetensors", "pt") as f:
        for key in f.keys():
            if not key.endswith(".u.weight"):
                continue
            u = f.get_tensor(key).double()
            v = f.get_tensor(key.replace(".u.weight", ".v.weight")).double()
            ratio = (u.norm(dim=0) / v.norm(dim=1)).log10()
            rows[key.split(".")[-3]].append((ratio.median().item(), u.abs().max().item(), v.abs().max().item()))
    return rows


if __name__ == "__main__":
    for model_dir in sys.argv[1:]:
        print(model_dir)
        for kind, rows in split_by_type(model_dir).items():
            t = torch.tensor(rows)
            print(f"  {kind:10s} log10(|u_k|/|v_k|): median {t[:, 0].median():5.2f}, range {t[:, 0].min():5.2f} to "
                  f"{t[:, 0].max():5.2f}; max |W_u| {t[:, 1].max():9.3g}, max |W_v| {t[:, 2].max():9.3g}")
