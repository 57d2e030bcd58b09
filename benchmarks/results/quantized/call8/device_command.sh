# issue 21, eleventh session: A/B in one process (8-layer 8B shape, NF4, both batch shapes, eager and compiled):
# LoRA's cores its parameters (main) vs stacked copies (before a95292d); LoCO's batched core recomputed in the
# backward (stop 34) vs keeping its float32 intermediates. Run right after call7 on the same warm machine.
export PYTHONPATH=$PWD/src:$PWD/.carry/lmq/b/bnb PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error; mkdir -p $OUT; OUT=$OUT timeout 500 python3 benchmarks/results/quantized/call8/recompute_ab.py 420 2>&1 | grep -v "^{\|Warning\|warn" | tail -50
