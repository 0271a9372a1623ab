#!/usr/bin/env bash
# The default preset three ways on SmolLM2-135M, each from an empty statistics cache of its own, at the protocol's
# calibration (64 × 2048 tokens of WikiText-2 validation, 8 gradient windows), R = 0.4:
#   whole      `svdllm compress --model smollm2-135m --ratio 0.4` (the model in memory)
#   layerwise  the same with --layerwise (one decoder layer in memory at a time, read from the checkpoint)
#   torchrun   the same under `torchrun --nproc-per-node 2` (windows sharded, sums all-reduced over gloo)
# then the layerwise and torchrun models compared with the whole one (ranks, every tensor, every W_u·W_v).
# Resumable: a run whose JSON exists is skipped; RUNS="whole layerwise" picks runs (to run some side by side).
# Raw results: OUT/compress-NAME.json (the command's --json, wall time), OUT/time-NAME.txt (/usr/bin/time -v),
# OUT/same-NAME.json (the comparison).   Usage: [RUNS="..."] bash benchmarks/scale/layerwise_smollm2.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/layerwise}
WORK=${WORK:-runs/layerwise-work}  # the models and caches (not committed)
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$OUT" "$WORK"
nproc > "$OUT/machine.txt"; lscpu | grep -E "Model name|^CPU\(s\)" >> "$OUT/machine.txt" || true
ARGS=(compress --model smollm2-135m --ratio 0.4 --json -q --overwrite)

run() {  # run NAME LAUNCHER... : compress from an empty cache into WORK/NAME
  local name=$1; shift
  [ -s "$OUT/compress-$name.json" ] && return 0
  rm -rf "$WORK/cache-$name" "$WORK/$name"
  local t0=$SECONDS
  /usr/bin/time -v -o "$OUT/time-$name.txt" "$@" "${ARGS[@]}" --cache-dir "$WORK/cache-$name" --out "$WORK/$name" \
    > "$WORK/$name.stdout" 2> "$OUT/compress-$name.log"
  python -c "import json, sys; rows = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]);
print(json.dumps({'wall_s': int(sys.argv[2]), 'rows': rows}, indent=1))" "$WORK/$name.stdout" $((SECONDS - t0)) \
    > "$OUT/compress-$name.json"
}
for name in ${RUNS:-whole layerwise torchrun}; do
  case $name in
    whole) run whole python -m svdllm.cli ;;
    layerwise) ARGS+=(--layerwise); run layerwise python -m svdllm.cli; unset 'ARGS[-1]' ;;
    torchrun) OMP_NUM_THREADS=1 run torchrun torchrun --nproc-per-node 2 -m svdllm.cli ;;
  esac
done
for name in layerwise torchrun; do
  if [ -s "$OUT/compress-whole.json" ] && [ -s "$OUT/compress-$name.json" ]; then
    python benchmarks/common/compare_models.py "$WORK/whole" "$WORK/$name" "$OUT/same-$name.json"
  fi
done
