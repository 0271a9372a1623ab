"""Render the markdown table of a protocol run (benchmarks/methods/protocol_smollm2.sh) from its JSON files.

Usage: python benchmarks/methods/protocol_table.py runs/protocol
"""
import json
import sys
from pathlib import Path


def main(run_dir: str) -> None:
    run = Path(run_dir)
    compress = json.loads((run / "compress.json").read_text())
    dense = json.loads((run / "eval-dense.json").read_text())["ppl"]["wikitext2"]
    print("| model | R (compressed linears) | parameters | WikiText-2 ppl | windows |")
    print("|---|---|---|---|---|")
    print(f"| dense | 0 | {compress['results'][0]['model_before']:,} | {dense['ppl']:.2f} | "
          f"{dense['windows']}/{dense['total_windows']} |")
    for row in compress["results"]:
        path = run / f"eval-r{row['ratio']}.json"
        if not path.exists():
            continue
        ev = json.loads(path.read_text())["ppl"]["wikitext2"]
        print(f"| svd-llm | {row['ratio']} (achieved {row['achieved_ratio']:.4f}) | {row['model_after']:,} | "
              f"{ev['ppl']:.2f} | {ev['windows']}/{ev['total_windows']} |")
    r = compress["results"][0]
    print()
    print(f"Calibration pass {r['calibration_s']:.0f} s, factorization (210 matrices, three ratios) "
          f"{r['factorization_s']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/protocol")
