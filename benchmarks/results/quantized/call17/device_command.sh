#!/usr/bin/env bash
# Call 17 (fourteenth session): LoCO k2 r3 (12 seeds, 3e-3) and OFT b32 (6 seeds, 2e-3) on the NF4 base with a frozen
# rank-8 correction of each adapted layer's rounding error kept in the base, after LoftQ's 5 alternations
# (call17/qcorr_patch.py, applied to the device's copy only). After `bash benchmarks/device_stash.sh .carry/lmq/a`.
set -uo pipefail
assets=.carry/lmq/b
bash benchmarks/device_gguf.sh $assets || exit 4
python3 benchmarks/results/quantized/call17/qcorr_patch.py || exit 5
mkdir -p $OUT/loco $OUT/oft
export OT_QCORR=8 OT_QCORR_T=5
OUT=$OUT/loco SCRATCH=/root/s1 BASES=nf4 bash benchmarks/device_lm_quant.sh $assets 420 loco --lr loco=3e-3 --seeds 12 > $OUT/loco/stdout.txt 2>&1 &
sleep 25
OUT=$OUT/oft SCRATCH=/root/s2 BASES=nf4 bash benchmarks/device_lm_quant.sh $assets 420 oft --lr oft=2e-3 --seeds 6 > $OUT/oft/stdout.txt 2>&1 &
wait
grep -h "OT_QCORR" $OUT/*/log_lm_nf4.txt | sort | uniq -c
tail -n 14 $OUT/loco/log_lm_nf4.txt $OUT/oft/log_lm_nf4.txt
