#!/usr/bin/env bash
# Instruct models: does calibrating on chat conversations as well keep a compressed instruct model answering?
# SmolLM2-135M-Instruct, kfac-svd + global (--preset best) at R = 0.4 on reduced calibration (16 windows of 1024,
# 4 gradient windows), calibrated on WikiText-2 alone and on WikiText-2 + Alpaca conversations (8 windows each);
# WikiText-2 perplexity on 32 test windows; benchmarks/evaluation/chat_turn.py on 50 PIQA goals as chat prompts.
# Usage: bash benchmarks/evaluation/chat_smollm2.sh [OUT_DIR]   (about 12 min on 2 cores)
set -euo pipefail
OUT=${1:-runs/chat}
SVDLLM=${SVDLLM:-svdllm}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$OUT"
for d in wikitext2 wikitext2,alpaca; do
  o=$OUT/${d/,/+}
  [ -d "$o" ] || $SVDLLM compress --model smollm2-135m --ratio 0.4 --nsamples 16 --seqlen 1024 --grad-samples 4 \
    --calib-dataset "$d" --out "$o" --json -q | tail -1 > "$OUT/compress-${d/,/+}.json"
  [ -s "$OUT/ppl-${d/,/+}.json" ] || $SVDLLM eval --model "$o" --ppl wikitext2 --max-windows 32 --json -q \
    | tail -1 > "$OUT/ppl-${d/,/+}.json"
done
python "$(dirname "$0")/chat_turn.py" smollm2-135m "$OUT/wikitext2" "$OUT/wikitext2+alpaca" --out "$OUT/chat_turn.json"
