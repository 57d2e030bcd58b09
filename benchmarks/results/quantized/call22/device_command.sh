#!/usr/bin/env bash
# Call 22 (issue 21, seventeenth session): every `-m gpu` test on main at 2f990cc. Carry .carry/lmq/b/bnb.
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/src:$PWD/.carry/lmq/b/bnb HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
git log -1 --format=%h 2>/dev/null
timeout 430 python3 -m pytest -q -m gpu -p no:cacheprovider tests -rs 2>&1 | tail -25 | tee $OUT/gpu_tests.log
