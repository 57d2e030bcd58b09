#!/usr/bin/env bash
# Call 16 (fourteenth session), recorded here: LoCO k2 r3 on the LM recipe, seeds 6-11 added to quality_lm_loco_bf16rot/ (main's
# bf16 rotation on NF4, and the bf16 base) and to its fp32_rotation_ab/ (the NF4 base rotating in float32: the same
# two-line switch as that A/B, applied to the device's copy only, active only under OT_LOCO_FP32=1).
# Run after `bash benchmarks/device_stash.sh .carry/lmq/a` on the same warm machine; results under $OUT/{main,fp32}.
set -uo pipefail
assets=.carry/lmq/b
r=benchmarks/results/quantized/quality_lm_loco_bf16rot
bash benchmarks/device_gguf.sh $assets || exit 4
python3 - <<'PY'
import pathlib
p = pathlib.Path("src/orthotune/methods/loco.py")
s = p.read_text()
old = "        return self.matmul_core_dtype(dtype, base)\n"
assert s.count(old) == 1
p.write_text(s.replace(old, "        import os\n        return dtype if os.environ.get('OT_LOCO_FP32') else self.matmul_core_dtype(dtype, base)\n"))
PY
mkdir -p $OUT/main $OUT/fp32
OUT=$OUT/main SCRATCH=/root/s1 RESUME=$r bash benchmarks/device_lm_quant.sh $assets 400 loco --sweep --grow 0 --lr loco=3e-3 --seeds 12 > $OUT/main/stdout.txt 2>&1 &
sleep 25
OUT=$OUT/fp32 SCRATCH=/root/s2 RESUME=$r/fp32_rotation_ab OT_LOCO_FP32=1 BASES=nf4 bash benchmarks/device_lm_quant.sh $assets 400 loco --lr loco=3e-3 --seeds 12 > $OUT/fp32/stdout.txt 2>&1 &
wait
tail -n 8 $OUT/main/log_lm_*.txt $OUT/fp32/log_lm_*.txt
