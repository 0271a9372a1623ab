#!/bin/bash
# kill -9 a compression in the middle of its calibration pass, run the same command again, compare with a run
# that was never interrupted
set -u
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
S=${1:-runs/killresume}; rm -rf $S; mkdir -p $S
ARGS="compress --model smollm2-135m --preset paper --ratio 0.4 --nsamples 8 --seed 1 -q --json"
${SVDLLM:-svdllm} $ARGS --cache-dir $S/cache-straight --out $S/straight > $S/straight.json 2>$S/straight.err
${SVDLLM:-svdllm} $ARGS --cache-dir $S/cache-killed --out $S/resumed > $S/first.json 2>$S/first.err &
PID=$!
while [ "$(ls $S/cache-killed/stats/*/layer_*.safetensors 2>/dev/null | wc -l)" -lt 13 ]; do sleep 0.5; done
kill -9 $PID; wait $PID; echo "killed with $(ls $S/cache-killed/stats/*/layer_*.safetensors | wc -l) of 30 layers cached; output dir exists: $(test -e $S/resumed && echo yes || echo no); leftovers: $(ls -a $S | grep -c tmp)" > $S/kill.txt
${SVDLLM:-svdllm} $ARGS --cache-dir $S/cache-killed --out $S/resumed > $S/resumed.json 2>$S/resumed.err
${PYTHON:-python} -c "
import torch, svdllm
a = svdllm.load('$S/straight'); b = svdllm.load('$S/resumed')
sa, sb = a.state_dict(), b.state_dict()
print('bit-identical:', sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa))
" >> $S/kill.txt 2>/dev/null
cat $S/kill.txt
