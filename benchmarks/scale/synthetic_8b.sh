#!/usr/bin/env bash
# The default at the scale users have: a synthetic model with Llama-3-8B's layer shapes (hidden 4,096, 32 heads /
# 8 KV heads, MLP 14,336, vocabulary 128,256), random weights, LAYERS decoder layers written as safetensors shards,
# compressed with `svdllm compress --layerwise` and the default preset on this machine. The calibration is small
# (NSAMPLES × SEQLEN tokens, GRAD gradient windows): per-layer times are per token and scale linearly; BENCHMARKS
# extrapolates them to 32 layers and the protocol's 64 × 2048 tokens on paper.
# Raw results: OUT/compress.json (the command's --json: phase times, peak RSS), OUT/disk.json (cache sizes).
# Usage: [LAYERS=2] [NSAMPLES=4] [SEQLEN=512] [GRAD=2] bash benchmarks/scale/synthetic_8b.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/synthetic_8b}
LAYERS=${LAYERS:-2} NSAMPLES=${NSAMPLES:-4} SEQLEN=${SEQLEN:-512} GRAD=${GRAD:-2}
WORK=${WORK:-runs/synthetic-8b-work}  # the model (about 6 GB for 2 layers) and the statistics: not committed
export SVDLLM_DATA_DIR=${SVDLLM_DATA_DIR:-../shared/data} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$OUT" "$WORK"
nproc > "$OUT/machine.txt"; lscpu | grep -E "Model name|^CPU\(s\)" >> "$OUT/machine.txt" || true
if [ ! -f "$WORK/model-$LAYERS/config.json" ]; then
  python - "$WORK/model-$LAYERS" "$LAYERS" <<'PY'
import sys, torch
import svdllm
from transformers import AutoModelForCausalLM, LlamaConfig
out, layers = sys.argv[1], int(sys.argv[2])
config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=128256, num_hidden_layers=layers, max_position_embeddings=8192,
                     rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained(out, max_shard_size="2GB")
_, tok = svdllm.load_model("smollm2-135m")  # any tokenizer whose ids fit the vocabulary
tok.save_pretrained(out)
PY
fi
rm -rf "$WORK/cache" "$WORK/out"
/usr/bin/time -v svdllm compress --model "$WORK/model-$LAYERS" --layerwise --ratio 0.4 --nsamples "$NSAMPLES" \
  --seqlen "$SEQLEN" --grad-samples "$GRAD" --cache-dir "$WORK/cache" --out "$WORK/out" --json -q \
  > "$WORK/stdout" 2> "$OUT/compress.log"
tail -1 "$WORK/stdout" > "$OUT/compress.json"
python - "$WORK" "$OUT/disk.json" "$LAYERS" "$NSAMPLES" "$SEQLEN" "$GRAD" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
stats = next((work / "cache" / "stats").iterdir())
grads = [p for p in stats.iterdir() if p.name.startswith("gradient")]  # the per-layer pass directory and row Fisher
out = {"layers": int(sys.argv[3]), "nsamples": int(sys.argv[4]), "seqlen": int(sys.argv[5]), "grad_samples": int(sys.argv[6]),
       "input_stats_bytes": sum(f.stat().st_size for f in stats.glob("layer_*.safetensors")),
       "gradient_stats_bytes": sum(size(p) if p.is_dir() else p.stat().st_size for p in grads), "model_out_bytes": size(work / "out"),
       "model_in_bytes": size(work / f"model-{sys.argv[3]}")}
Path(sys.argv[2]).write_text(json.dumps(out, indent=1) + "\n")
PY
cat "$OUT/disk.json"
