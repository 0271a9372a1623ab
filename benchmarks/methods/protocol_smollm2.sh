#!/usr/bin/env bash
# Full-protocol run for SmolLM2-135M (PROTOCOL.md): dense perplexity, one calibration pass (64 × 2048 tokens of
# WikiText-2 validation, seed 0) serving R = 0.2, 0.4, 0.6, then each model's WikiText-2 perplexity.
# Usage: bash benchmarks/methods/protocol_smollm2.sh [OUT_DIR]   (about 1–1.5 h on 2 CPU cores)
set -euo pipefail
OUT=${1:-runs/protocol}
SVDLLM=${SVDLLM:-svdllm}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data}
mkdir -p "$OUT"
nproc > "$OUT/machine.txt"; lscpu | grep -E "Model name|^CPU\(s\)" >> "$OUT/machine.txt" || true
$SVDLLM compress --model smollm2-135m --preset paper --ratio 0.2,0.4,0.6 --nsamples 64 --seqlen 2048 --seed 0 \
  --out "$OUT/smollm2-svdllm" --overwrite --json -q | tail -1 > "$OUT/compress.json"
$SVDLLM eval --model smollm2-135m --ppl wikitext2 --json -q | tail -1 > "$OUT/eval-dense.json"
for r in 0.2 0.4 0.6; do
  $SVDLLM eval --model "$OUT/smollm2-svdllm/ratio-$r" --ppl wikitext2 --json -q | tail -1 > "$OUT/eval-r$r.json"
done
cat "$OUT"/*.json
