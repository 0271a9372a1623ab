#!/usr/bin/env bash
# Every factorization method at R = 0.2, 0.4, 0.6 (uniform ranks) on SmolLM2-135M, full-protocol WikiText-2
# perplexity. The input statistics are gathered once and cached, so every method after the first skips the
# calibration pass (fwsvd adds one cached gradient pass). The closed-form update needs the compressed model's own
# activations, hence one pass per method and ratio.
# Usage: bash benchmarks/methods_smollm2.sh [OUT_DIR] [METHODS]   (many hours on 2 CPU cores)
set -euo pipefail
OUT=${1:-runs/methods}
METHODS=${2:-svd-llm svd-llm-v2 asvd dipsvd fwsvd svd}
SVDLLM=${SVDLLM:-svdllm}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data}
mkdir -p "$OUT"
for m in $METHODS; do
  for update in none closed-form; do
    $SVDLLM compress --model smollm2-135m --alloc uniform --method "$m" --update "$update" --ratio 0.2,0.4,0.6 --nsamples 64 \
      --seqlen 2048 --seed 0 --out "$OUT/$m-$update" --overwrite --json -q | tail -1 > "$OUT/compress-$m-$update.json"
    for r in 0.2 0.4 0.6; do
      $SVDLLM eval --model "$OUT/$m-$update/ratio-$r" --ppl wikitext2 --json -q | tail -1 > "$OUT/eval-$m-$update-r$r.json"
    done
  done
done
