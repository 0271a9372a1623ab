#!/usr/bin/env bash
# Issue "Rank allocation": which allocator spends one budget best? SmolLM2-135M, method svd-llm, no update, the
# protocol's calibration (64 × 2048 tokens of WikiText-2 validation, seed 0, cached: every allocator reuses the one
# pass), gradient pass on 8 of those windows; R = 0.2, 0.4, 0.6.
#   OUT_DIR      full protocol (all 148 WikiText-2 test windows): v2, lorap, dipsvd, global; global with the raw KFAC
#                predictions (calibrate=0) at R = 0.4 in OUT_DIR/calibrate0 (the uniform rows are protocol_smollm2.sh's)
#   SCREEN_DIR   the screen (first 8 test windows): every allocator in SCREEN_DIR/screen, and variants of global:
#                screen-cal (measured per-type scales), screen-mk0.5 (min_keep=0.5), screen-pl (per_layer=1)
# The committed results (benchmarks/results/alloc_smollm2/ and alloc_smollm2-screen/) were made in sessions 2–4 by
# these grid.py commands run by hand (BENCHMARKS.md, "Allocation"; the full-protocol files were renamed by hand to
# compress-<alloc>.json and eval-<alloc>-rR.json); this script gathers them and has not been run as a whole since.
# `global` then had no refinement, so global is run here with refine=0 (today's default is refine=1: BENCHMARKS.md,
# "Refining the global allocation"); the screen's "lorap, first default" row was made by a lorap rule since replaced.
# Resumable (grid.py skips finished compressions and evaluations).
# Render with: python benchmarks/common/grid_table.py DIR
# Usage: bash benchmarks/allocation/alloc_smollm2.sh [OUT_DIR] [SCREEN_DIR]   (cost of the whole not recorded: each
# full evaluation 15-40 min, global's compression of three ratios 2335 s, the others' 87-91 s: compress-*.json)
set -euo pipefail
OUT=${1:-runs/alloc}
SCREEN=${2:-runs/alloc-screen}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
GRID="python benchmarks/common/grid.py"
# full protocol
$GRID "$OUT" --configs svd-llm:global --ratios 0.4,0.2,0.6 --extra="--grad-samples=8 --alloc-arg refine=0"
$GRID "$OUT" --configs svd-llm:v2,svd-llm:lorap,svd-llm:dipsvd --ratios 0.4,0.2,0.6 --extra=--grad-samples=8
$GRID "$OUT/calibrate0" --configs svd-llm:global --ratios 0.4 --extra="--grad-samples=8 --alloc-arg calibrate=0"
# the screen: first 8 of the 148 test windows
W="--max-windows 8"
$GRID "$SCREEN/screen" --configs svd-llm:uniform,svd-llm:v2,svd-llm:lorap,svd-llm:dipsvd --ratios 0.4,0.6,0.2 $W \
  --extra=--grad-samples=8
$GRID "$SCREEN/screen" --configs svd-llm:global --ratios 0.4,0.6,0.2 $W \
  --extra="--grad-samples=8 --alloc-arg calibrate=0"
$GRID "$SCREEN/screen-cal" --configs svd-llm:global --ratios 0.4,0.6 $W --extra="--grad-samples=8 --alloc-arg refine=0"
$GRID "$SCREEN/screen-mk0.5" --configs svd-llm:global --ratios 0.4,0.6 $W \
  --extra="--grad-samples=8 --alloc-arg calibrate=0 --alloc-arg min_keep=0.5"
$GRID "$SCREEN/screen-pl" --configs svd-llm:global --ratios 0.4,0.6 $W \
  --extra="--grad-samples=8 --alloc-arg calibrate=0 --alloc-arg per_layer=1"
