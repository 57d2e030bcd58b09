# issue 21, twelfth session, after call12: LoCO on a quantised base rotates in the frozen matmul's compute dtype
# (bf16; its core K and factors A made there, one cast of the input shared with bitsandbytes): the 8-layer table.
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/src:$PWD/.carry/lmq/b/bnb PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
timeout 330 python3 benchmarks/quantized.py --sections main --batches 1x2048,4x1024 --modes eager,compiled --warmup 2 --steps 3 --deadline 300 --out $OUT 2>&1 | grep "^|\|^#" | tail -50
