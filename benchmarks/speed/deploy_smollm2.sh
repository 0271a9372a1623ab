#!/usr/bin/env bash
# Issue "Deployment": SmolLM2-135M at R = 0.2, 0.4, 0.6 (svd-llm, uniform): prefill/decode tokens/s and peak memory
# against dense (each model in its own process), KV-cache bytes at 2048 tokens (dynamic vs low-rank), and the
# perplexity and size of svd-llm + int8 / int4 weights against the dense model quantized alone.
# Usage: bash benchmarks/speed/deploy_smollm2.sh [OUT_DIR]     (about 3 hours on 2 CPU cores: 45 min of bench, 15-30 min per evaluation; finished steps are skipped)
set -euo pipefail
OUT=${1:-runs/deploy}
SVDLLM=${SVDLLM:-svdllm}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data}
mkdir -p "$OUT"
[ -d "$OUT/svd-llm/ratio-0.6" ] || $SVDLLM compress --model smollm2-135m --preset paper --ratio 0.2,0.4,0.6 --out "$OUT/svd-llm" --overwrite -q
for r in 0.2 0.4 0.6; do
  [ -s "$OUT/bench-$r.json" ] || $SVDLLM bench --model "$OUT/svd-llm/ratio-$r" --batch-sizes 1,4 --prompt-lens 128,512 \
      --kv-lengths 2048 --json | tail -1 > "$OUT/bench-$r.json"
done
for scheme in int8 int4; do
  [ -d "$OUT/dense-$scheme" ] || $SVDLLM quantize --model smollm2-135m --scheme $scheme --out "$OUT/dense-$scheme" --json -q \
      | tail -1 > "$OUT/quantize-dense-$scheme.json"
  for r in 0.2 0.4; do
    [ -d "$OUT/svd-llm-$r-$scheme" ] || $SVDLLM quantize --model "$OUT/svd-llm/ratio-$r" --scheme $scheme \
        --out "$OUT/svd-llm-$r-$scheme" --json -q | tail -1 > "$OUT/quantize-$r-$scheme.json"
  done
done
for m in dense-int8 dense-int4 svd-llm-0.4-int8 svd-llm-0.4-int4 svd-llm-0.2-int8 svd-llm-0.2-int4; do
  [ -s "$OUT/eval-$m.json" ] || $SVDLLM eval --model "$OUT/$m" --ppl wikitext2 --json -q | tail -1 > "$OUT/eval-$m.json"
done
