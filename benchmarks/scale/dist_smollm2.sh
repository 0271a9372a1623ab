#!/bin/bash
# SmolLM2: 2 processes (torchrun, gloo) against 1, same calibration (8 windows, seed 2), no statistics cache
set -u
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
S=${1:-runs/dist}; rm -rf $S; mkdir -p $S
ARGS="compress --model smollm2-135m --preset paper --ratio 0.4 --nsamples 8 --seed 2 --no-cache -q --json"
/usr/bin/time -v ${SVDLLM:-svdllm} $ARGS --out $S/one > $S/one.json 2>$S/one.err
/usr/bin/time -v ${TORCHRUN:-torchrun} --nproc-per-node 2 -m svdllm.cli $ARGS --out $S/two > $S/two.json 2>$S/two.err
${PYTHON:-python} -c "
import torch, svdllm
from svdllm.factorization import LowRankLinear
a = svdllm.load('$S/one'); b = svdllm.load('$S/two')
mods = dict(a.named_modules()); worst = 0.0; same = True
for n, m in b.named_modules():
    if isinstance(m, LowRankLinear):
        pa, pb = mods[n].u.weight @ mods[n].v.weight, m.u.weight @ m.v.weight
        worst = max(worst, float((pa - pb).norm() / pa.norm()))
        same = same and mods[n].rank == m.rank
print('ranks equal:', same, 'largest relative difference of W_u W_v:', worst)
" > $S/compare.txt 2>/dev/null
grep -h "Elapsed\|Maximum resident" $S/one.err $S/two.err >> $S/compare.txt
cat $S/compare.txt
