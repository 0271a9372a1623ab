#!/usr/bin/env bash
# Same models before and after a refactoring: five SmolLM2-135M compressions built with the code of one src/
# directory (SRC), so that a run on the old code and a run on the new code can be compared tensor by tensor
# (same_models_compare.py BEFORE_DIR AFTER_DIR OUT.json: every saved tensor torch.equal, same keys, same ranks).
#
#   default-r0.4     compress --ratio 0.4                 the default preset (kfac-svd + global allocator, no update)
#   default-r0.6     compress --ratio 0.6                 the default preset with the closed-form update (R >= 0.5)
#   joint-int4       compress --ratio 0.836 --bits 3,4,8  rank and bits together at dense int4's bytes
#   layerwise-r0.4   compress --ratio 0.4 --layerwise     one decoder layer in memory at a time
#   torchrun-r0.4    torchrun --nproc-per-node 2 -m svdllm.cli compress --ratio 0.4   (gloo, OMP_NUM_THREADS=1,
#                    a free --master-port)
#
# All with --model smollm2-135m, a REDUCED calibration (--nsamples 8 --seqlen 256 --grad-samples 4, the same for
# all) and --no-cache, so that every pass (calibration, gradients, spectra, allocation, factorization) runs in each
# version; each also gets an empty SVDLLM_CACHE_DIR of its own, so that each version also converts the bundled
# model from its GGUF package itself (SVDLLM_CACHE_DIR/models/), and the run fails if anything else is written there
# (that would be the statistics cache, used despite --no-cache). The thread count is left at torch's default
# (recorded in OUT/<name>.env), except for the torchrun run, which sets OMP_NUM_THREADS=1 (as dist_smollm2.sh and
# layerwise_smollm2.sh do: two processes on a 2-core machine). Run both versions on the same machine, with the same
# environment, so that the thread counts agree.
#
# Per configuration NAME, in OUT_DIR:
#   NAME/           the saved model (--out)
#   NAME.json       the `-q --json` result (the JSON line of rank 0 for torchrun; raw stdout in NAME.stdout)
#   NAME.log        stderr of the run
#   NAME.time.txt   /usr/bin/time -v (peak RSS etc.)
#   NAME.env        SRC, the svdllm module actually imported, versions, threads, the command line
#   wall.tsv        one line per finished configuration: NAME, wall seconds, SRC
# A configuration's old outputs are removed before it runs; the script stops at the first failure (non-zero exit).
#
# Usage (from anywhere; paths are resolved, the commands run from the repository root):
#   SRC=/path/to/src bash benchmarks/reliability/same_models_refactor.sh OUT_DIR
#   ONLY=default-r0.4,joint-int4 SRC=... bash benchmarks/reliability/same_models_refactor.sh OUT_DIR   (a subset)
# Overridable: PYTHON (default ROOT/.venv/bin/python), TORCHRUN (default ROOT/.venv/bin/torchrun),
# SVDLLM_DATA_DIR (default ../shared/data from the repository root).
set -euo pipefail

ALL=(default-r0.4 default-r0.6 joint-int4 layerwise-r0.4 torchrun-r0.4)

# R of the joint run: the fraction of the linears' float32 bytes removed that leaves the bytes of dense int4.
# From benchmarks/results/frontier_smollm2/ (commit 53c075f): frontier_plot.budget_ratio on the committed
# quantize-dense-int4-rtn.json gives ceil((1 - 69672960 / (4 * 106168320)) * 1e4) / 1e4 = 0.836, the ratio of that
# directory's compress-joint.json result at int4's bytes (eval-joint-r0.836.json) and of compress-rank-only-r0.836.
JOINT_INT4_RATIO=0.836

usage() { echo "usage: SRC=/path/to/src bash $0 OUT_DIR   [ONLY=name,name...]  names: ${ALL[*]}" >&2; exit 2; }
[ $# -eq 1 ] || usage
[ -n "${SRC:-}" ] || usage
[ -f "$SRC/svdllm/cli.py" ] || { echo "SRC=$SRC has no svdllm/cli.py" >&2; exit 2; }
SRC=$(cd "$SRC" && pwd -P)
mkdir -p "$1"
OUT=$(cd "$1" && pwd -P)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
cd "$ROOT"

PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
TORCHRUN=${TORCHRUN:-$ROOT/.venv/bin/torchrun}
SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data}
[ -d "$SVDLLM_DATA_DIR" ] || { echo "SVDLLM_DATA_DIR=$SVDLLM_DATA_DIR is not a directory (from $ROOT)" >&2; exit 2; }
SVDLLM_DATA_DIR=$(cd "$SVDLLM_DATA_DIR" && pwd -P)
export PYTHONPATH=$SRC SVDLLM_DATA_DIR HF_HUB_OFFLINE=1

if [ -n "${ONLY:-}" ]; then
  IFS=, read -r -a NAMES <<< "$ONLY"
  for n in "${NAMES[@]}"; do
    [[ " ${ALL[*]} " == *" $n "* ]] || { echo "unknown configuration $n (known: ${ALL[*]})" >&2; exit 2; }
  done
else
  NAMES=("${ALL[@]}")
fi

# The code that runs must be SRC's, not the editable install of the venv.
"$PYTHON" - "$SRC" <<'PY'
import os, sys
import svdllm, svdllm.cli
src = os.path.realpath(sys.argv[1])
for m in (svdllm, svdllm.cli):
    if not os.path.realpath(m.__file__).startswith(src + os.sep):
        sys.exit(f"{m.__name__} is imported from {m.__file__}, not from SRC={src}")
PY
[ -x "$TORCHRUN" ] || { echo "TORCHRUN=$TORCHRUN is not executable" >&2; exit 2; }

COMMON=(--model smollm2-135m --nsamples 8 --seqlen 256 --grad-samples 4 --no-cache -q --json --overwrite)

current="" cache=""
trap 'rc=$?; if [ $rc -ne 0 ] && [ -n "$current" ]; then echo "FAILED: $current (exit $rc), see $OUT/$current.log" >&2; fi
[ -z "$cache" ] || rm -rf "$cache"' EXIT

run() {  # run NAME LAUNCHER... -- COMPRESS_ARGS...
  local name=$1; shift
  local launcher=()
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
  shift
  current=$name
  rm -rf "${OUT:?}/$name" "$OUT/$name.json" "$OUT/$name.log" "$OUT/$name.stdout" "$OUT/$name.time.txt" \
    "$OUT/$name.env"
  cache=$(mktemp -d "${TMPDIR:-/tmp}/svdllm-same-cache.XXXXXX")
  local cmd=("${launcher[@]}" compress "$@" "${COMMON[@]}" --out "$OUT/$name")
  {
    echo "name=$name"
    echo "date=$(date -u +%FT%TZ)"
    echo "src=$SRC"
    echo "src_git=$(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo none) dirty=$(git -C "$SRC" status --porcelain -- . 2>/dev/null | wc -l)"
    echo "src_py_sha256=$(cd "$SRC" && find . -name '*.py' -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
    echo "python=$PYTHON torchrun=$TORCHRUN"
    echo "svdllm_data_dir=$SVDLLM_DATA_DIR hf_hub_offline=$HF_HUB_OFFLINE"
    echo "OMP_NUM_THREADS=${OMP_NUM_THREADS-unset} MKL_NUM_THREADS=${MKL_NUM_THREADS-unset}"
    "$PYTHON" -c "import svdllm, torch, platform; print('svdllm', svdllm.__file__, getattr(svdllm, '__version__', '?')); \
print('torch', torch.__version__, 'threads', torch.get_num_threads(), 'python', platform.python_version())"
    echo "cpus=$(nproc --all) (nproc, which counts OMP_NUM_THREADS: $(nproc)) cpu=$(lscpu 2>/dev/null | sed -n 's/^ *Model name: *//p' | head -1)"
    printf 'command='; printf '%q ' "${cmd[@]}"; echo
  } > "$OUT/$name.env"
  echo "[$(date +%T)] $name: start" >&2
  local t0 t1
  t0=$(date +%s.%N)
  SVDLLM_CACHE_DIR=$cache /usr/bin/time -v -o "$OUT/$name.time.txt" "${cmd[@]}" \
    > "$OUT/$name.stdout" 2> "$OUT/$name.log"
  t1=$(date +%s.%N)
  # the result: the JSON line with "results" (rank 0's; under torchrun rank 1 prints its own short line too)
  "$PYTHON" - "$OUT/$name.stdout" "$OUT/$name.json" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
main = [r for r in rows if "results" in r]
if len(main) != 1:
    sys.exit(f"{sys.argv[1]}: expected one JSON result line with 'results', found {len(main)}")
open(sys.argv[2], "w").write(json.dumps(main[0]) + "\n")
PY
  [ -f "$OUT/$name/svdllm_manifest.json" ] || { echo "$name: no svdllm_manifest.json in $OUT/$name" >&2; return 1; }
  compgen -G "$OUT/$name/*.safetensors" > /dev/null || { echo "$name: no safetensors in $OUT/$name" >&2; return 1; }
  # models/ holds the model converted from its GGUF package (by this version's loader); anything else (stats/,
  # scratch/ ...) would be the statistics cache, which --no-cache must leave alone
  if [ -n "$(ls -A "$cache" | grep -vx models)" ]; then
    echo "$name: the statistics cache $cache was written despite --no-cache:" >&2; ls -R "$cache" >&2; return 1
  fi
  rm -rf "$cache"; cache=""
  if grep -q -- "--preset best: " "$OUT/$name.log"; then  # the preset fell back (too little disk for the Grams)
    echo "$name: the default preset was adjusted on this machine (see $OUT/$name.log); not the intended config" >&2
    return 1
  fi
  local wall
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\n' "$name" "$wall" "$SRC" >> "$OUT/wall.tsv"
  echo "[$(date +%T)] $name: done in ${wall%.*} s" >&2
  current=""
}

PY_CLI=("$PYTHON" -m svdllm.cli)
for name in "${NAMES[@]}"; do
  case $name in
    default-r0.4) run "$name" "${PY_CLI[@]}" -- --ratio 0.4 ;;
    default-r0.6) run "$name" "${PY_CLI[@]}" -- --ratio 0.6 ;;
    joint-int4) run "$name" "${PY_CLI[@]}" -- --ratio "$JOINT_INT4_RATIO" --bits 3,4,8 ;;
    layerwise-r0.4) run "$name" "${PY_CLI[@]}" -- --ratio 0.4 --layerwise ;;
    # the only run with a thread count set: two processes on this 2-core machine, one thread each
    # a free port for the rendezvous (MASTER_PORT to choose one): torchrun's default 29500 fails, or worse, when
    # another torchrun on this shared machine holds it
    torchrun-r0.4)
      port=${MASTER_PORT:-$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
      OMP_NUM_THREADS=1 run "$name" "$TORCHRUN" --nproc-per-node 2 --master-port "$port" -m svdllm.cli -- --ratio 0.4 ;;
  esac
done
echo "all done: ${NAMES[*]} in $OUT (SRC=$SRC)" >&2
