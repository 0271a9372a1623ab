#!/usr/bin/env bash
# The default, measured as it is: `svdllm compress` with no method, allocator or update named (--preset best) on
# SmolLM2-135M at R = 0.2, 0.4, 0.6 in one run, at the full protocol (64 × 2048 tokens of WikiText-2 validation,
# seed 0, 8 gradient windows), from an empty statistics cache; each model's WikiText-2 perplexity (all 148
# windows); then, from those same models (the same ranks: the allocation is read back from the run's cache), the
# rows the preset does not build: the closed-form update at R = 0.2 and 0.4, no update at R = 0.6, and SVD-LLM's
# LoRA stage (`svdllm finetune --preset cpu`) on each default model.
# Resumable: a step whose JSON exists is skipped. Raw results: OUT/*.json; README/BENCHMARKS quote them.
# Usage: bash benchmarks/methods/best_smollm2.sh [OUT_DIR]   (the default run about 25 min alone on 2 cores, each full
# evaluation 15–25 min, each LoRA stage pair about 15 min)
set -euo pipefail
OUT=${1:-runs/best}
RUNS=${RUNS:-runs/best-models}  # the models (large; not committed)
SVDLLM=${SVDLLM:-svdllm}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
CACHE="$RUNS/cache"  # a cache of this run's own: empty the first time, whatever ~/.cache/svdllm holds
mkdir -p "$OUT" "$RUNS"
machine() { nproc; lscpu | grep -E "Model name|^CPU\(s\)" || true; }
[ -s "$OUT/machine.txt" ] || machine > "$OUT/machine.txt"  # the machine of the scored run, kept

source "$(dirname "$0")/../common/step.sh"

# 1. the default, three ratios, one run
step compress-best $SVDLLM compress --model smollm2-135m --ratio 0.2,0.4,0.6 --cache-dir "$CACHE" \
  --out "$RUNS/best" --overwrite
if [ ! -d "$RUNS/best/ratio-0.6" ]; then  # a new machine: the models again (same ranks), the first run's record kept
  machine > "$OUT/machine-rebuild.txt"  # the steps from here on run on this one
  step compress-best-rebuild $SVDLLM compress --model smollm2-135m --ratio 0.2,0.4,0.6 --cache-dir "$CACHE" \
    --out "$RUNS/best" --overwrite
fi
for r in 0.2 0.4 0.6; do
  if [ -s "$OUT/manifest-best-r$r.json" ] && ! python3 - "$OUT/manifest-best-r$r.json" \
      "$RUNS/best/ratio-$r/svdllm_manifest.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
diff = [k for k in a["ranks"] if a["ranks"][k] != b["ranks"].get(k)]
if diff or a["params"] != b["params"]:
    sys.exit(f"The rebuilt model ({sys.argv[2]}) is not the one scored ({sys.argv[1]}): {len(diff)} ranks differ, "
             f"{b['params']['model_after']} against {a['params']['model_after']} parameters.")
print(f"{sys.argv[2]}: the same {len(a['ranks'])} ranks and parameter count as the model scored")
PY
  then
    # another machine's float32 moved ranks at the margin: the rows below start from this model, scored here too
    cp "$RUNS/best/ratio-$r/svdllm_manifest.json" "$OUT/manifest-best-rebuild-r$r.json"
    REBUILT="${REBUILT:-} $r"
    continue
  fi
  if [ -s "$OUT/manifest-best-r$r.json" ]; then  # the scored model's record stays; the rebuild's beside it
    cp "$RUNS/best/ratio-$r/svdllm_manifest.json" "$OUT/manifest-best-rebuilt-r$r.json"
  else
    cp "$RUNS/best/ratio-$r/svdllm_manifest.json" "$OUT/manifest-best-r$r.json"
  fi
  step eval-best-r$r $SVDLLM eval --model "$RUNS/best/ratio-$r" --ppl wikitext2
done
# 2. in the order a session cut short loses least (the models live on one machine): R = 0.4's LoRA row, R = 0.6
# without update (no extra pass), the closed-form update at R = 0.2 and 0.4 on the same ranks, the other LoRA rows
lora() {  # SVD-LLM's LoRA stage on the default model at ratio $1
  step finetune-best-r$1 $SVDLLM finetune "$RUNS/best/ratio-$1" --out "$RUNS/lora-r$1" --preset cpu --overwrite
  step eval-lora-r$1 $SVDLLM eval --model "$RUNS/lora-r$1" --ppl wikitext2
}
lora 0.4
step compress-none-r0.6 $SVDLLM compress --model smollm2-135m --ratio 0.6 --update none --cache-dir "$CACHE" \
  --out "$RUNS/none-r0.6" --overwrite
step eval-none-r0.6 $SVDLLM eval --model "$RUNS/none-r0.6" --ppl wikitext2
for r in ${REBUILT:-}; do
  step eval-best-rebuild-r$r $SVDLLM eval --model "$RUNS/best/ratio-$r" --ppl wikitext2
done
step compress-closed-form $SVDLLM compress --model smollm2-135m --ratio 0.2,0.4 --update closed-form \
  --cache-dir "$CACHE" --out "$RUNS/closed-form" --overwrite
for r in 0.4 0.2; do
  step eval-closed-form-r$r $SVDLLM eval --model "$RUNS/closed-form/ratio-$r" --ppl wikitext2
done
lora 0.2
lora 0.6
