#!/usr/bin/env bash
# Call 23 (issue 21, seventeenth session): compiled LoCO at 1 x 2048 took 1.022-1.025x peft LoRA's step in call20 (both samples)
# against 0.954 (call13) and 0.999 (call18). Since then quantized.py traces under orthotune's compile_settings
# (dynamo's skip_fwd_side_effects_in_bwd_under_checkpoint, for transformers >= 5.25). A/B in one call, alternating:
# the benchmark as on main ("flag") and a copy tracing without the setting ("noflag"). Carry .carry/lmq/b/bnb.
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/src:$PWD/.carry/lmq/b/bnb PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
sed 's/with compile_settings(compiled), /with compile_settings(False), /' benchmarks/quantized.py > benchmarks/quantized_noflag.py
grep -c "compile_settings(False)" benchmarks/quantized_noflag.py || exit 3
args=(--sections main --batches 1x2048 --modes compiled --only "LoRA r16,LoCO" --compiled-methods "peft LoRA r16,LoCO" --warmup 2 --steps 5)
for round in 1 2; do
  for v in flag noflag; do
    script=benchmarks/quantized.py; [ $v = noflag ] && script=benchmarks/quantized_noflag.py
    timeout 150 python3 $script "${args[@]}" --out $OUT/$v$round 2>&1 | grep "^| peft LoRA r16 |\|^| LoCO\|Error" | sed "s/^/$v$round /"
    rm -f $OUT/$v$round/quantized.md $OUT/$v$round/memory_vs_size.png
  done
done
