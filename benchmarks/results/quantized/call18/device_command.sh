# issue 21, fourteenth session: the 8-layer table again on main (a second sample of call13 with HRA rotating in
# bf16 as since call14), same command.
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/src:$PWD/.carry/lmq/b/bnb PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
timeout 330 python3 benchmarks/quantized.py --sections main --batches 1x2048,4x1024 --modes eager,compiled --warmup 2 --steps 3 --deadline 300 --out $OUT 2>&1 | grep "^|\|^#" | tail -50
