#!/usr/bin/env bash
# Gemma 3 270M (262,144-token vocabulary, sliding-window and global layers, logit soft-capping) compressed layer by
# layer (--layerwise) at R = 0.4 with the default preset (kfac-svd + global) and with --preset paper (SVD-LLM,
# uniform ranks), on the same calibration windows (NSAMPLES × 2048 tokens of WikiText-2 validation, seed 0, 8
# gradient windows); each model and the dense one scored on the first 8 WikiText-2 test windows.
# Resumable: a step whose JSON exists is skipped. Raw results: OUT/*.json (each command's --json), OUT/time-*.txt.
# Usage: [NSAMPLES=64] bash benchmarks/scale/gemma_default.sh [OUT_DIR]   (needs `make gemma`)
set -euo pipefail
OUT=${1:-runs/gemma}
WORK=${WORK:-runs/gemma-work}  # the models and their statistics (not committed)
NSAMPLES=${NSAMPLES:-64}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$OUT" "$WORK"
nproc > "$OUT/machine.txt"; lscpu | grep -E "Model name|^CPU\(s\)" >> "$OUT/machine.txt" || true

step() {  # step NAME COMMAND...: run once, keep the command's --json (its last stdout line) as OUT/NAME.json
  local name=$1; shift
  [ -s "$OUT/$name.json" ] && return 0
  /usr/bin/time -v -o "$OUT/time-$name.txt" "$@" --json -q > "$WORK/$name.stdout" 2> "$OUT/$name.log"
  tail -1 "$WORK/$name.stdout" > "$OUT/$name.json.tmp" && mv "$OUT/$name.json.tmp" "$OUT/$name.json"
}
for preset in best paper; do
  step compress-$preset svdllm compress --model gemma3-270m --layerwise --preset $preset --ratio 0.4 \
    --nsamples "$NSAMPLES" --cache-dir "$WORK/cache" --out "$WORK/$preset" --overwrite
  step eval-$preset svdllm eval --model "$WORK/$preset" --ppl wikitext2 --max-windows 8
done
step eval-dense svdllm eval --model gemma3-270m --ppl wikitext2 --max-windows 8
