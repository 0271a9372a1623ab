#!/usr/bin/env bash
# Issue "Beyond SVD-LLM": kfac-svd on SmolLM2-135M. Screen (8 test windows) with uniform and global ranks, the
# full-protocol row of kfac-svd + global, and the output-shrinkage screen. Resumable (finished steps are skipped).
# Usage: bash benchmarks/kfac_smollm2.sh [OUT_DIR]   (about 1 h on 2 CPU cores with cached statistics)
set -euo pipefail
OUT=${1:-runs/kfac}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
python benchmarks/grid.py "$OUT/screen" --configs kfac-svd:uniform,kfac-svd:global --ratios 0.4,0.2,0.6 \
  --max-windows 8 --extra=--grad-samples=8
python benchmarks/grid.py "$OUT/screen" --configs kfac-svd:global --ratios 0.4,0.2,0.6 --extra=--grad-samples=8
for so in 0 0.3 1; do
  python benchmarks/grid.py "$OUT/shrink-o$so" --configs kfac-svd:uniform --ratios 0.4,0.2 --max-windows 8 \
    --extra="--grad-samples=8 --method-arg shrink_outputs=$so"
done
