# issue 21, eleventh session: main's table after LoRA's cores became its parameters and LoCO's batched core is
# recomputed in the backward (stop 34): the 8-layer table at both batch shapes, eager and compiled, one H200 call.
# bitsandbytes 0.50.2 carried in the ignored .carry/lmq/b/bnb.
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/src:$PWD/.carry/lmq/b/bnb PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
timeout 585 python3 benchmarks/quantized.py --sections main --batches 1x2048,4x1024 --modes eager,compiled --warmup 2 --steps 3 --deadline 470 --out $OUT 2>&1 | grep -v "^{" | tail -60
