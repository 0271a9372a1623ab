#!/usr/bin/env bash
# The same model from two versions of the code, for each bundled model: `svdllm compress` with the default preset at
# R = 0.4 (no update) and 0.6 (the closed-form update) in one run, from no statistics cache, with the code of SRC_A
# and of SRC_B (each a checkout's src/), then every saved tensor compared (benchmarks/common/compare_models.py). Shorter
# calibration than the protocol (NSAMPLES × SEQLEN tokens, GRAD gradient windows) so that both models fit in an hour
# on 2 cores; what it checks is that the code paths give the same model, not the model's quality.
# Raw results: OUT/<model>-r<R>.json.
# Usage: SRC_A=old/src SRC_B=src bash benchmarks/reliability/same_model_families.sh [OUT_DIR]   (needs `make gemma` for Gemma)
set -euo pipefail
OUT=${1:-runs/same-families}
MODELS=${MODELS:-smollm2-135m gemma3-270m}
NSAMPLES=${NSAMPLES:-8} SEQLEN=${SEQLEN:-512} GRAD=${GRAD:-2}
PY=${PY:-python}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/svdllm-same.XXXXXX")}
mkdir -p "$OUT"
for model in $MODELS; do
  for side in a b; do
    src=$([ $side = a ] && echo "$SRC_A" || echo "$SRC_B")
    [ -s "$WORK/$model-$side/ratio-0.6/svdllm_manifest.json" ] && continue
    PYTHONPATH="$src" $PY -m svdllm.cli compress --model "$model" --ratio 0.4,0.6 --nsamples "$NSAMPLES" \
      --seqlen "$SEQLEN" --grad-samples "$GRAD" --no-cache --out "$WORK/$model-$side" --overwrite -q \
      > /dev/null 2> "$OUT/compress-$model-$side.log"
  done
  for r in 0.4 0.6; do
    $PY benchmarks/common/compare_models.py "$WORK/$model-a/ratio-$r" "$WORK/$model-b/ratio-$r" "$OUT/$model-r$r.json"
  done
done
