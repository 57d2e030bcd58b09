#!/usr/bin/env bash
# Issue 21, seventeenth session: is LoCO's 2.8-point NF4 gap (../quality_lm_loco_bf16rot/, 12 seeds at 3e-3) a rate
# too close to the NF4 base's instability (9e-3 collapsed there to 3.5 on validation, to 34 on bf16)? LoCO k2 r3 on the
# LM recipe at 2e-3 on both bases, seeds 0-11, no sweep; compared seed by seed with the 3e-3 runs.
# Run after `bash benchmarks/device_stash.sh .carry/lmq/a` on the same warm machine, carry .carry/lmq/b.
set -uo pipefail
bash benchmarks/device_lm_quant.sh .carry/lmq/b 290 loco --lr loco=2e-3 --seeds 12
