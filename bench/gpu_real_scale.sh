#!/usr/bin/env bash
# The real-dimension measurements of bench/real_dimensions.py on a GPU machine, in minutes:
#   bash bench/gpu_real_scale.sh [OUT_DIR]
# 1. capture ratios to a bare forward on the whole models where they fit one 80 GB GPU (OLMoE-1B-7B,
#    16 layers; GPT-OSS-20B, 24 layers; bf16, random weights; nothing written to disk);
# 2. every model at 4 layers: capture ratios, `route` tokens/s and peak GPU and host memory with one
#    process (and two when the machine has two GPUs), and the route writer's peak at 1M-token shards
#    of the full model's routing shape.
# Needs the project installed (bash scripts/setup.sh); writes OUT_DIR/real_dimensions_*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-results}"
mkdir -p "$out"
py=.venv/bin/python
[ -x "$py" ] || py=python
procs=1
if [ "$("$py" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then procs="1 2"; fi
"$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(0))'
"$py" bench/real_dimensions.py --device cuda --layers full --models olmoe-1b-7b gpt-oss-20b \
  --tokens 8192 --batch 4 --reps 5 --json "$out/real_dimensions_full.json"
"$py" bench/real_dimensions.py --device cuda --layers 4 --tokens 8192 --batch 4 --reps 5 \
  --route --procs $procs --route-tokens 262144 --writer --json "$out/real_dimensions_4layers.json"
