#!/usr/bin/env bash
# Issue "Evaluation suite": SmolLM2-135M dense against svd-llm (uniform ranks, the protocol's calibration) at
# R = 0.2 and 0.4: the seven zero-shot tasks of the SVD-LLM paper on their full sets, scored by lm-eval, and
# WikiText-2 / PTB / C4 perplexity. One JSON per (model, task or perplexity set). Inside a task the scores of each
# finished chunk of 1,000 documents are kept in SCORES_DIR/<model>/<task>.jsonl (portable: commit them, and a
# run on another machine or day goes on from there), so the same command resumes an interrupted run.
# Render with: python benchmarks/evaluation/eval_table.py OUT_DIR (the tables); the script ends with
# `svdllm compare OUT_DIR/*.json --out OUT_DIR/accuracy` (compare.md, ppl_vs_ratio.png, zero_shot_vs_ratio.png).
# Usage: bash benchmarks/evaluation/eval_smollm2.sh [OUT_DIR] [COMPRESSED_DIR]   (many hours on 2 CPU cores: HellaSwag alone
# is about 40,000 scored continuations per model; it runs last)
# Two cores: SHARD=0/2 and SHARD=1/2, one thread each (OMP_NUM_THREADS=1), side by side on the same OUT_DIR:
# they split the perplexity sets between them and score alternate documents of each task into the same scores
# files; whichever finishes a task last writes its JSON.
set -euo pipefail
OUT=${1:-runs/eval}
RUN=${2:-runs/protocol/smollm2-svdllm}     # written by benchmarks/methods/protocol_smollm2.sh
SVDLLM=${SVDLLM:-svdllm}
BATCH=${BATCH:-8}                          # requests per lm-eval forward
SCORES=${SCORES_DIR:-$OUT/scores}          # per-document zero-shot scores, one folder per model
# LIMIT=N: a quick check of the script (N examples per task, 2 windows per perplexity set); its OUT_DIR then
# holds partial numbers, so give the real run another one
WINDOWS=${LIMIT:+--max-windows 2}
LIMIT=${LIMIT:+--limit $LIMIT}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$OUT"
SHARD=${SHARD:-0/1}
K=${SHARD%/*} N=${SHARD#*/}
(  # one compression, however many instances start at once
  flock 9
  [ -d "$RUN/ratio-0.4" ] || $SVDLLM compress --model smollm2-135m --preset paper --ratio 0.2,0.4 --nsamples 64 \
    --seqlen 2048 --seed 0 --out "$RUN" --overwrite -q
) 9>"$OUT/.compress.lock"
run() {  # run DEST ARGS...: `svdllm eval ARGS --json` into DEST, atomically, unless DEST exists
  local dest=$1; shift
  [ -s "$dest" ] && return 0
  $SVDLLM eval "$@" --json -q | tail -1 > "$dest.tmp"
  mv "$dest.tmp" "$dest"
}
zs() {  # like run, but keeps DEST only once every document of the task is scored (by this shard or the others)
  local dest=$1; shift
  [ -s "$dest" ] && return 0
  local tmp="$dest.$K.tmp"  # one per instance: the other shard may be writing the same DEST
  $SVDLLM eval "$@" --json -q | tail -1 > "$tmp"
  if grep -q '"complete": true' "$tmp"; then mv "$tmp" "$dest"; else rm -f "$tmp"; fi
}
declare -A MODEL=([dense]=smollm2-135m [r0.2]="$RUN/ratio-0.2" [r0.4]="$RUN/ratio-0.4")
item=0
for set in wikitext2 ptb c4; do
  for name in dense r0.4 r0.2; do
    if [ $((item++ % N)) -eq "$K" ]; then
      run "$OUT/ppl-$name-$set.json" --model "${MODEL[$name]}" --ppl "$set" $WINDOWS
    fi
  done
done
for task in openbookqa arc_challenge winogrande piqa arc_easy mathqa hellaswag; do
  for name in dense r0.4 r0.2; do
    zs "$OUT/zs-$name-$task.json" --model "${MODEL[$name]}" --ppl none --tasks "$task" --batch-size "$BATCH" \
      --scores-dir "$SCORES/$name" --shard "$SHARD" $LIMIT
  done
done
$SVDLLM compare "$OUT"/*.json --out "$OUT/accuracy" -q
