#!/usr/bin/env bash
# Call 24 (issue 21, planned in the eighteenth session): NF4 against bf16 on the LM recipe for the two orthogonal
# methods, scored on 2000 test questions instead of the recipe's 200: the recipe at data.eval_size=2000 (its data
# as JSON lines from `python benchmarks/lm_data.py --out .carry/lmq/b/lm-data-2000 --eval-size 2000`: the first 200 test
# questions are the recipe's, train and val are drawn as the recipe draws them, never repeating a test question). On
# 200 questions the gap between one bf16 and one NF4 run carries 2.4-3.1 points of the test set's own sampling error
# (README), the same questions for every seed. Seeds 0-8 at the rates of the earlier tables
# (LoCO k2 r3 3e-3: ../quality_lm_loco_bf16rot/; OFT b32 2e-3: ../quality_lm_swept/), no step-0 evaluation (the same
# base for every seed). One method per device call (18 runs at once, one round):
#   run 1: bash benchmarks/device_stash.sh .carry/lmq/a                        (carry .carry/lmq/a)
#   run 2: bash benchmarks/results/quantized/call24/device_command.sh loco     (carry .carry/lmq/b, same warm machine)
#   run 3: bash benchmarks/results/quantized/call24/device_command.sh oft      (carry .carry/lmq/b)
# A call cut by its deadline continues with RESUME=<the earlier call's files folder> in the next.
# Run in the twentieth session: OFT's NF4 seed 8 ran out of GPU memory among the 18 processes (README), and the next
# call ran it alone: RESUME=.carry/lmq/b/resume_oft BASES=nf4 bash .../device_command.sh oft (the first call's NF4 file
# carried in resume_oft/).
set -uo pipefail
method=${1:?loco or oft}
case $method in loco) lr=3e-3 ;; oft) lr=2e-3 ;; *) echo "loco or oft, not $method"; exit 2 ;; esac
[ -f .carry/lmq/b/lm-data-2000/test.jsonl ] || { echo "python benchmarks/lm_data.py --out .carry/lmq/b/lm-data-2000 --eval-size 2000 first"; exit 3; }
LM_DATA=lm-data-2000 bash benchmarks/device_lm_quant.sh .carry/lmq/b 520 $method --lr $method=$lr --seeds 9 --set lm:train.eval_before=false
