#!/usr/bin/env bash
# Issue "Beyond SVD-LLM": kfac-svd on SmolLM2-135M. The screen (8 test windows) with uniform and global ranks and
# the output-shrinkage screen, then the full-protocol table: kfac-svd with every allocator, and kfac-svd + global
# with the closed-form updates and LoRA. Resumable: finished compressions and evaluations are skipped, cached
# statistics and allocations are reused, an interrupted closed-form pass resumes after its last finished layer.
# Usage: bash benchmarks/methods/kfac_smollm2.sh [OUT_DIR]   (the screen about 1 h on 2 CPU cores with cached statistics;
# the full table many hours: each full evaluation is 15-40 min, each closed-form pass 40-60 min at one thread)
# Render with: python benchmarks/common/grid_table.py OUT_DIR/full
set -euo pipefail
OUT=${1:-runs/kfac}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
G="--extra=--grad-samples=8"
python benchmarks/common/grid.py "$OUT/screen" --configs kfac-svd:uniform,kfac-svd:global --ratios 0.4,0.2,0.6 \
  --max-windows 8 "$G"
for so in 0 0.3 1; do
  python benchmarks/common/grid.py "$OUT/shrink-o$so" --configs kfac-svd:uniform --ratios 0.4,0.2 --max-windows 8 \
    --extra="--grad-samples=8 --method-arg shrink_outputs=$so"
done
# full protocol, in the order that decides the most: the candidates for the goal first
python benchmarks/common/grid.py "$OUT/full" --configs kfac-svd:global,kfac-svd:global:closed-form-drift,kfac-svd:global:closed-form \
  --ratios 0.4,0.2,0.6 "$G"
python benchmarks/common/grid.py "$OUT/full" --configs kfac-svd:uniform,kfac-svd:v2,kfac-svd:lorap,kfac-svd:dipsvd \
  --ratios 0.4,0.2,0.6 "$G"
python benchmarks/common/grid.py "$OUT/full" --configs kfac-svd:global:lora,kfac-svd:global:closed-form+lora \
  --ratios 0.4,0.2,0.6 "$G"
