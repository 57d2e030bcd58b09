# issue 21, eleventh session: eager LoCA's excess over peft LoRA: an A/B of its update added in place (8 layers,
# loca_eager_ab.py), then the 2-layer profile of both (top kernels, launches).
export PYTHONPATH=$PWD/src:$PWD/.carry/lmq/b/bnb PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
OUT=$OUT timeout 120 python3 benchmarks/results/quantized/call9/loca_eager_ab.py 2>&1 | grep -v "^{\|Warning\|warn" | tail -14
timeout 75 python3 benchmarks/quantized_profile.py --layers 2 --only "peft LoRA r16,LoCA" --modes eager --out $OUT/profile 2>&1 | grep -v "Warning\|warn" | grep "^|" | head -8
