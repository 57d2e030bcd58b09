#!/usr/bin/env bash
# GPU call 3 of the evaluation table (see benchmarks/device_assets.py): the causal-LM task, from the
# repository root with the carried folder C (device_assets.py's c/: the GGUF's last part, its sha256, the
# wheels, lm-data/); the GGUF's earlier parts must be in /root (device_call1.sh, device_stash.sh) on the
# same warm machine. Usage: bash benchmarks/device_call2.sh C DEADLINE_SECONDS [quality.py options...]
set -uo pipefail
cd "$(dirname "$0")/.."
assets=$(realpath "$1") deadline=$2; shift 2
bash benchmarks/device_gguf.sh "$assets" || exit 4
export PYTHONPATH=$PWD/src:/root/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export ORTHOTUNE_CACHE=/root/ot-cache ORTHOTUNE_SMOLLM2_GGUF=/root/SmolLM2-135M-Instruct.Q4_1.gguf
# dequantise once here, not in every worker at the same time
python3 -c "from orthotune.recipes.assets import smollm2_path; print('SmolLM2 folder', smollm2_path())" 2>&1 | grep -v "Loading weights" || exit 6
d=$assets/lm-data
timeout $((deadline + 40)) python3 benchmarks/quality.py --tasks lm --workers 10 --threads 1 --deadline "$deadline" \
  --out "$OUT" --tag call2 --scratch /root/bench --set "lm:data.train_file=$d/train.jsonl" \
  --set "lm:data.validation_file=$d/val.jsonl" --set "lm:data.test_file=$d/test.jsonl" "$@" 2>&1 | grep -v "Loading weights" | tee "$OUT/log_call2.txt"
ls -la "$OUT"
