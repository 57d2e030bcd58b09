#!/usr/bin/env bash
# One round on the GPU machine (from a copy made by carry.sh): the GPU tests, then the efficiency
# benchmark with any extra arguments; logs and results go under $OUT, the table is printed last.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 ORTHOTUNE_COMMIT=$(cat COMMIT) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, peft, triton; print(torch.__version__, transformers.__version__, peft.__version__, triton.__version__)"
  timeout 240 python3 -m pytest -q -m gpu tests/training/test_gpu.py -p no:cacheprovider
} > "$OUT/gpu_tests.log" 2>&1
tail -4 "$OUT/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-470}" python3 benchmarks/efficiency.py --out "$OUT" "$@" 2>&1 | grep -v -i warn | tee "$OUT/run.log"
