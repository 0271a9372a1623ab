#!/usr/bin/env bash
# Issue "The method family": every factorization method at R = 0.2, 0.4, 0.6 (uniform ranks) on SmolLM2-135M,
# without and with the closed-form update, full-protocol WikiText-2 perplexity. The input statistics are gathered
# once and cached, so every method after the first skips the calibration pass (fwsvd adds one cached gradient
# pass of 8 windows). The closed-form update needs the compressed model's own activations: one pass per method and
# ratio (about 40 min each at one thread). Resumable: finished compressions and evaluations are skipped, and an
# interrupted closed-form pass resumes after its last finished layer.
# Usage: bash benchmarks/methods/methods_smollm2.sh [OUT_DIR] [METHODS]   (many hours on 2 CPU cores)
# Render with: python benchmarks/common/grid_table.py OUT_DIR
set -euo pipefail
OUT=${1:-runs/methods}
METHODS=${2:-svd-llm,svd-llm-v2,asvd,dipsvd,fwsvd,svd}
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
python benchmarks/common/grid.py "$OUT" --configs "$METHODS" --ratios 0.4,0.2,0.6 --extra=--grad-samples=8
python benchmarks/common/grid.py "$OUT" --configs "$(echo "$METHODS" | sed 's/\([^,]*\)/\1:uniform:closed-form/g')" \
  --ratios 0.4,0.2,0.6 --extra=--grad-samples=8
