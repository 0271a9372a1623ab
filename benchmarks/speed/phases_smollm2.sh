#!/usr/bin/env bash
# The default's wall time and phase times on SmolLM2-135M: README's command (`svdllm compress --model smollm2-135m
# --ratio 0.4`, the default preset: kfac-svd + global with refine=1, no update) at the protocol's calibration (64 ×
# 2048 tokens of WikiText-2 validation, 8 gradient windows), from an empty statistics cache, with the code of this
# checkout (LABEL "after") or of another one (SRC=path/to/other/src LABEL=before). Run it alone on the machine.
# Raw results: OUT/compress-LABEL.json (the command's --json: wall and phase times), OUT/manifest-LABEL.json.
# Usage: [SRC=../old/src] [LABEL=before] bash benchmarks/speed/phases_smollm2.sh [OUT_DIR]   (about 13 minutes on 2 cores)
set -euo pipefail
OUT=${1:-runs/phases}
LABEL=${LABEL:-after}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
[ -n "${SRC:-}" ] && export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/svdllm-phases.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
nproc > "$OUT/machine.txt"; lscpu | grep -E "Model name|^CPU\(s\)" >> "$OUT/machine.txt" || true
python -c "import svdllm, sys; print('svdllm from', svdllm.__file__, file=sys.stderr)"
t0=$(date +%s.%N)
python -m svdllm.cli compress --model smollm2-135m --ratio 0.4 --cache-dir "$WORK/cache" --out "$WORK/model" --json -q \
  > "$WORK/stdout" 2> "$OUT/compress-$LABEL.log"
t1=$(date +%s.%N)
python - "$WORK/stdout" "$OUT/compress-$LABEL.json" "$t0" "$t1" <<'PY'
import json, sys
rows = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
out = {"wall_s": float(sys.argv[4]) - float(sys.argv[3]), "rows": rows}
open(sys.argv[2], "w").write(json.dumps(out, indent=1) + "\n")
PY
cp "$WORK/model/svdllm_manifest.json" "$OUT/manifest-$LABEL.json"
