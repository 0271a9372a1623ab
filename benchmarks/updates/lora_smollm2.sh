#!/usr/bin/env bash
# Issue "Parameter update": SmolLM2-135M, svd-llm uniform at R = 0.4 and 0.6: WikiText-2 perplexity after the
# truncation, after the closed-form update (SVD-LLM's, and the variant fitting the attention to the dense model's
# outputs), and after sequential LoRA (CPU preset), with the fine-tuning wall time.
# Usage: bash benchmarks/updates/lora_smollm2.sh [OUT_DIR] [WHITENED_RUN]   (resumable: finished steps are skipped, an
# interrupted fine-tuning resumes from its checkpoint). WHITENED_RUN: the svd-llm models of
# benchmarks/methods/protocol_smollm2.sh, reused instead of compressing again (default runs/protocol/smollm2-svdllm).
# Cost on 2 CPU cores: each LoRA fine-tuning about 30 min, each closed-form pass 40-60 min, each evaluation
# 15-40 min.
set -euo pipefail
OUT=${1:-runs/lora}
SVDLLM=${SVDLLM:-svdllm}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data}
mkdir -p "$OUT"
WHITENED=${2:-runs/protocol/smollm2-svdllm}
if [ ! -e "$OUT/whiten" ] && [ -d "$WHITENED/ratio-0.4" ] && [ -d "$WHITENED/ratio-0.6" ]; then
  ln -s "$(realpath "$WHITENED")" "$OUT/whiten"
fi
[ -d "$OUT/whiten/ratio-0.6" ] || $SVDLLM compress --model smollm2-135m --preset paper --ratio 0.4,0.6 --out "$OUT/whiten" --overwrite -q
for r in 0.4 0.6; do
  for update in closed-form closed-form-drift; do
    dir=${update/closed-form/closed}  # closed, closed-drift
    [ -d "$OUT/$dir/ratio-$r" ] || $SVDLLM compress --model smollm2-135m --preset paper --ratio $r --update $update \
        --out "$OUT/$dir/ratio-$r" --overwrite -q
  done
  [ -d "$OUT/lora-$r" ] || $SVDLLM finetune "$OUT/whiten/ratio-$r" --out "$OUT/lora-$r" --preset cpu --no-balance --json -q \
      | tail -1 > "$OUT/finetune-$r.json"
  for m in "whiten/ratio-$r" "closed/ratio-$r" "closed-drift/ratio-$r" "lora-$r"; do
    tag=$(echo "$m" | tr '/' '_')
    [ -s "$OUT/eval-$tag.json" ] || $SVDLLM eval --model "$OUT/$m" --ppl wikitext2 --json -q | tail -1 > "$OUT/eval-$tag.json"
  done
done
