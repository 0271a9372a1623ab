#!/usr/bin/env bash
# A/B timing of the closed-form pass between an earlier commit's code and the working tree's, on SmolLM2
# (svd-llm, R = 0.4, 8 calibration windows × 2048, dense statistics cached, one thread), alternating, and a check
# that both write the same model bit for bit.
# Usage: bash benchmarks/speed/ab_closed_form.sh OLD_COMMIT [ROUNDS]
set -euo pipefail
old=$1; rounds=${2:-2}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/old"; git archive "$old" src | tar -x -C "$work/old"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
py=${PYTHON:-python}
run() {  # $1: source tree, $2: label
  PYTHONPATH=$1 /usr/bin/time -f "%e s, peak RSS %M KB" "$py" -m svdllm.cli compress --model smollm2-135m \
    --method svd-llm --alloc uniform --update closed-form --ratio 0.4 --nsamples 8 --cache-dir "$work/cache" \
    --out "$work/out-$2" --overwrite --json -q 2>&1 >/dev/null | tail -1
}
echo "cold run (fills the dense statistics cache): $(run src new)"
for k in $(seq "$rounds"); do
  echo "$old: $(run "$work/old/src" old)"
  echo "working tree: $(run src new)"
done
"$py" - "$work" <<'P'
import glob, sys
from safetensors.torch import load_file
a, b = {}, {}
for f in glob.glob(f"{sys.argv[1]}/out-old/*.safetensors"): a.update(load_file(f))
for f in glob.glob(f"{sys.argv[1]}/out-new/*.safetensors"): b.update(load_file(f))
same = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
print(f"{len(a)} tensors, identical: {same}")
P
