#!/usr/bin/env bash
# The same default model from two versions of the code: `svdllm compress --model smollm2-135m --ratio 0.4` (the
# default preset) with the code of SRC_A and of SRC_B (each a checkout's src/), both from a copy of the statistics
# cache CACHE without its allocation records (so that spectra, allocation and factorization run again, and only
# the calibration and gradient passes are read back), then every saved tensor compared.
# With FRESH_GRADIENTS=1 the gradient statistics are left out of the copies too, so each version runs its own
# gradient pass. Raw result: OUT/same-model.json (OUT/same-model-fresh-gradients.json with FRESH_GRADIENTS=1).
# Usage: SRC_A=old/src SRC_B=src CACHE=runs/best-models/cache bash benchmarks/reliability/same_model_smollm2.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/same-model}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/svdllm-same.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
SUFFIX=""; [ "${FRESH_GRADIENTS:-0}" = 1 ] && SUFFIX=-fresh-gradients
for side in a b; do
  src=$([ $side = a ] && echo "$SRC_A" || echo "$SRC_B")
  cp -al "$CACHE" "$WORK/cache-$side"  # hard links: the statistics are read, never rewritten
  rm -f "$WORK"/cache-$side/stats/*/allocation_*.json
  if [ -n "$SUFFIX" ]; then rm -rf "$WORK"/cache-$side/stats/*/gradient*; fi
  PYTHONPATH="$src" python -m svdllm.cli compress --model smollm2-135m --ratio 0.4 --cache-dir "$WORK/cache-$side" \
    --out "$WORK/model-$side" -q > /dev/null 2> "$OUT/compress-$side$SUFFIX.log"
done
python - "$WORK/model-a" "$WORK/model-b" "$SRC_A" "$SRC_B" "$OUT/same-model$SUFFIX.json" <<'PY'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file

def tensors(d):
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out

a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
ma, mb = (json.loads((Path(d) / "svdllm_manifest.json").read_text()) for d in sys.argv[1:3])
diff = max(float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-300)) for k in a)
result = {"a": sys.argv[3], "b": sys.argv[4], "same_keys": a.keys() == b.keys(),
          "bit_identical": all(torch.equal(a[k], b[k]) for k in a), "max_relative_difference": diff,
          "same_ranks": ma["ranks"] == mb["ranks"], "params": [ma["params"]["model_after"], mb["params"]["model_after"]],
          "timings": [ma["timings"], mb["timings"]]}
Path(sys.argv[5]).write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps({k: v for k, v in result.items() if k != "timings"}))
PY
