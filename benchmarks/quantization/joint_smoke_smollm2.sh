#!/usr/bin/env bash
# A first look at rank and bits chosen together (--bits) on SmolLM2-135M, before the frontier (frontier_smollm2.sh):
# the byte budget of dense int4 in groups of 32 (R = 0.8359 of the linears' float32 bytes), widths 3, 4, 8, on a
# small calibration (8 × 512 tokens of WikiText-2 validation, 2 gradient windows, no cache); WikiText-2 perplexity on
# the first 8 windows of 2048, as the GPTQ screen (gptq_screen_smollm2.sh) scores dense int4.
# Usage: bash benchmarks/quantization/joint_smoke_smollm2.sh [OUT_DIR]   (about 10 min; OMP_NUM_THREADS=1 beside other jobs)
set -euo pipefail
OUT=${1:-runs/joint-smoke}
RUNS=${RUNS:-runs/joint-smoke-models}
SVDLLM=${SVDLLM:-svdllm}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$OUT" "$RUNS"
source "$(dirname "$0")/../common/step.sh"
step compress-bits $SVDLLM compress --model smollm2-135m --ratio 0.8359 --bits 3,4,8 --nsamples 8 --seqlen 512 \
  --grad-samples 2 --no-cache --out "$RUNS/m" --overwrite
cp "$RUNS/m/svdllm_manifest.json" "$OUT/manifest.json"
step eval-bits $SVDLLM eval --model "$RUNS/m" --ppl wikitext2 --max-windows 8
