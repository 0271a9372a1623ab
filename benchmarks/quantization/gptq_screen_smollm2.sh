#!/usr/bin/env bash
# A screen before the frontier (issue 31): does error feedback (GPTQ) stop int4 from wrecking the low-rank factors?
# SmolLM2-135M dense, SVD-LLM (--preset paper) and the default at R = 0.4, each in float32, int4 round-to-nearest
# (torchao, symmetric, groups of 32) and int4 GPTQ (asymmetric, groups of 32, NSAMPLES × 2048 calibration tokens of
# WikiText-2 validation, seed 0; default 16, a quarter of the protocol's 64, for time: the sequential pass is the
# cost); WikiText-2 test perplexity on the first WINDOWS windows of 2048 (a screen, not the protocol's 148). The default model is read from DEFAULT_MODEL (best_smollm2.sh's R = 0.4) when it exists.
# Resumable: a step whose JSON exists is skipped. Raw results: OUT/*.json.
# Usage: bash benchmarks/quantization/gptq_screen_smollm2.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/gptq-screen}
RUNS=${RUNS:-runs/gptq-screen-models}
WINDOWS=${WINDOWS:-8}
NSAMPLES=${NSAMPLES:-16}
SVDLLM=${SVDLLM:-svdllm}
DEFAULT_MODEL=${DEFAULT_MODEL:-runs/best-models/best/ratio-0.4}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$OUT" "$RUNS"

source "$(dirname "$0")/../common/step.sh"
ppl() { step "eval-$1" $SVDLLM eval --model "$2" --ppl wikitext2 --max-windows "$WINDOWS"; }

step compress-paper $SVDLLM compress --model smollm2-135m --preset paper --ratio 0.4 --out "$RUNS/paper" --overwrite
models=("dense:smollm2-135m" "paper:$RUNS/paper")
[ -d "$DEFAULT_MODEL" ] && models+=("default:$DEFAULT_MODEL")
for entry in "${models[@]}"; do
  name=${entry%%:*} model=${entry#*:}
  ppl "$name-float" "$model"
  for method in rtn gptq; do
    calib=(); [ "$method" = gptq ] && calib=(--nsamples "$NSAMPLES")
    step "quantize-$name-int4-$method" $SVDLLM quantize --model "$model" --scheme int4 --method "$method" \
      "${calib[@]}" --out "$RUNS/$name-int4-$method" --overwrite
    ppl "$name-int4-$method" "$RUNS/$name-int4-$method"
  done
done
