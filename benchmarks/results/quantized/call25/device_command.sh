#!/usr/bin/env bash
# Call 25 (issue 21, twenty-first session): does more rotation capacity close LoCO's NF4 gap? Call 24 measured LoCO
# k2 r3 (the recipe's matched budget, 0.9x LoRA r8's parameters) at -3.9 points NF4 - bf16 on 2000 test questions,
# and the CPU pilot's training losses showed its NF4 runs fitting the training data worse to the end (OFT's caught up).
# The capacity arms are LoCO at 2.4x that budget, seeds 0-8 on both bases, the call-24 setup otherwise (data.eval_size=2000,
# no step-0 evaluation), at 2e-3 (the rate at which the NF4 runs spread least: ../quality_lm_loco_rate/):
#   r8: chain_length 2, rank 8 (a wider subspace per rotation)   k4: chain_length 4, rank 4 (a longer chain)
#   r3: chain_length 2, rank 3 (the matched budget: call 24's arm at this call's rate, the control; added after r8 and k4 ran)
#   run 1: bash benchmarks/device_stash.sh .carry/lmq/a                               (carry .carry/lmq/a)
#   run 2: bash benchmarks/results/quantized/call25/device_command.sh r8              (carry .carry/lmq/b, same warm machine)
#   run 3: bash benchmarks/results/quantized/call25/device_command.sh k4              (carry .carry/lmq/b)
#   run 4: bash benchmarks/results/quantized/call25/device_command.sh r3              (carry .carry/lmq/b)
set -uo pipefail
arm=${1:?r3, r8 or k4}
case $arm in r3) shape='{"chain_length": 2, "rank": 3}' ;; r8) shape='{"chain_length": 2, "rank": 8}' ;; k4) shape='{"chain_length": 4, "rank": 4}' ;; *) echo "r3, r8 or k4, not $arm"; exit 2 ;; esac
[ -f .carry/lmq/b/lm-data-2000/test.jsonl ] || { echo "python benchmarks/lm_data.py --out .carry/lmq/b/lm-data-2000 --eval-size 2000 first"; exit 3; }
LM_DATA=lm-data-2000 bash benchmarks/device_lm_quant.sh .carry/lmq/b 480 loco --lr loco=${LR:-2e-3} --seeds 9 \
  --adapter "loco=$shape" --set lm:train.eval_before=false
