#!/usr/bin/env bash
# The bytes–perplexity frontier of SmolLM2-135M (issue 31): WikiText-2 perplexity at the full protocol (all 148
# windows of 2048 tokens) against the bytes of the decoder layers' linears as svdllm stores them (values, and a
# float32 scale and int8 zero point per row and group of 32), for
#   dense            float32, and int8 / int4 / int3 by round-to-nearest and by GPTQ (64 × 2048 calibration tokens)
#   the default      R = 0.2 / 0.4 / 0.6 (best_smollm2.sh's models and evaluations) in float32, int8 and int4 (GPTQ)
#   rank and bits    `compress --bits 3,4,8` at the bytes of the dense int8, int4 and int3 GPTQ models
#   rank only        the default in float32 at the bytes of the dense int4 model
#   SVD-LLM          R = 0.4 (`--preset paper`) in float32 and int4 (GPTQ): the issue's first goal
# then the table and the PNG (frontier_plot.py). Resumable: a step whose JSON exists is skipped.
# Usage: bash benchmarks/quantization/frontier_smollm2.sh [OUT_DIR [UNIT...]]   (BEST: best_smollm2.sh's model directory. Its
# steps took 11.4 h of one thread in all, run as 2-3 streams beside one another (wall.txt), most of it the 19 full
# evaluations and the GPTQ runs.) Without units it runs them all in order; a unit is dense:SCHEME:METHOD, joint,
# default:R:SCHEME, paper, rank-only or plot, so that two runs (one thread each) can share the work:
#   bash benchmarks/quantization/frontier_smollm2.sh OUT default:0.4:int4 paper &  bash benchmarks/quantization/frontier_smollm2.sh OUT joint &
set -euo pipefail
OUT=${1:-runs/frontier}
RUNS=${RUNS:-runs/frontier-models}
BEST=${BEST:-runs/best-models/best}
BEST_RESULTS=${BEST_RESULTS:-benchmarks/results/best_smollm2}
SVDLLM=${SVDLLM:-svdllm}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$OUT" "$RUNS"
source "$(dirname "$0")/../common/step.sh"
ppl() { step "eval-$1" $SVDLLM eval --model "$2" --ppl wikitext2; }
budget() { python3 "$(dirname "$0")/frontier_plot.py" --budget "$OUT" "$@"; }  # R at those dense models' bytes

dense() {  # $1 scheme, $2 method
  step "quantize-dense-$1-$2" $SVDLLM quantize --model smollm2-135m --scheme "$1" --method "$2" \
    --out "$RUNS/dense-$1-$2" --overwrite
  ppl "dense-$1-$2" "$RUNS/dense-$1-$2"
}

# rank and bits together, at the byte counts of the dense int8 / int4 / int3 models (GPTQ and round-to-nearest store
# the same bytes, so the cheap RTN run gives the budget; R rounded up: never more bytes than they)
joint() {
  local scheme
  for scheme in int8 int4 int3; do
    step "quantize-dense-$scheme-rtn" $SVDLLM quantize --model smollm2-135m --scheme $scheme --method rtn \
      --out "$RUNS/dense-$scheme-rtn" --overwrite
  done
  local ratios
  ratios=$(budget int8 int4 int3)
  step compress-joint $SVDLLM compress --model smollm2-135m --ratio "$ratios" --bits 3,4,8 --out "$RUNS/joint" \
    --overwrite
  local r
  for r in ${ratios//,/ }; do
    ppl "joint-r$r" "$RUNS/joint/ratio-$r"
  done
}

# rank only: the default in float32 at dense int4's bytes (R = the fraction of the linears' float32 bytes removed)
rank_only() {
  step quantize-dense-int4-rtn $SVDLLM quantize --model smollm2-135m --scheme int4 --method rtn \
    --out "$RUNS/dense-int4-rtn" --overwrite
  local r
  r=$(budget int4)
  step "compress-rank-only-r$r" $SVDLLM compress --model smollm2-135m --ratio "$r" --out "$RUNS/rank-only-r$r" \
    --overwrite
  ppl "rank-only-r$r" "$RUNS/rank-only-r$r"
}

# the default's models (best_smollm2.sh), quantized by GPTQ
default() {  # $1 ratio, $2 scheme
  if [ ! -d "$BEST/ratio-$1" ]; then
    echo "No $BEST/ratio-$1: build the default's models first (benchmarks/methods/best_smollm2.sh), or set BEST." >&2
    exit 1
  fi
  step "quantize-default-r$1-$2" $SVDLLM quantize --model "$BEST/ratio-$1" --scheme "$2" --method gptq \
    --out "$RUNS/default-r$1-$2" --overwrite
  ppl "default-r$1-$2" "$RUNS/default-r$1-$2"
}

# SVD-LLM at R = 0.4, the paper's method, in float32 and int4: the issue's first goal
paper() {
  step compress-paper-r0.4 $SVDLLM compress --model smollm2-135m --preset paper --ratio 0.4 --out "$RUNS/paper" \
    --overwrite
  ppl paper-r0.4-float "$RUNS/paper"
  step quantize-paper-r0.4-int4 $SVDLLM quantize --model "$RUNS/paper" --scheme int4 --method gptq \
    --out "$RUNS/paper-r0.4-int4" --overwrite
  ppl paper-r0.4-int4 "$RUNS/paper-r0.4-int4"
}

plot() { python3 "$(dirname "$0")/frontier_plot.py" "$OUT" "$BEST_RESULTS"; }

units=("${@:2}")
if [ ${#units[@]} -eq 0 ]; then
  units=(dense-float)
  for scheme in int4 int3 int8; do units+=("dense:$scheme:gptq" "dense:$scheme:rtn"); done
  units+=(joint)
  for r in 0.4 0.2 0.6; do units+=("default:$r:int4" "default:$r:int8"); done
  units+=(paper rank-only plot)
fi
for unit in "${units[@]}"; do
  case $unit in
    dense-float) ppl dense-float smollm2-135m ;;
    dense:*:*|default:*:*) IFS=: read -r kind a b <<< "$unit"; "$kind" "$a" "$b" ;;
    joint|paper|plot) "$unit" ;;
    rank-only) rank_only ;;
    *) echo "unknown unit $unit (dense:SCHEME:METHOD, dense-float, joint, default:R:SCHEME, paper, rank-only, plot)" >&2; exit 2 ;;
  esac
done
