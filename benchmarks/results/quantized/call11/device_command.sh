# issue 21, twelfth session, right after call10 on a fresh machine: the A/Bs of ab.py (eager LoCO's one-node rotation
# against call10's plain ops; compiled LoCA's Triton rows against inductor's own gather), then main's table.
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/src:$PWD/.carry/lmq/b/bnb PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
mkdir -p $OUT/ab $OUT/table
OUT=$OUT/ab timeout 260 python3 benchmarks/results/quantized/call11/ab.py 2>&1 | grep "^|" | tail -16
timeout 320 python3 benchmarks/quantized.py --sections main --batches 1x2048,4x1024 --modes eager,compiled --warmup 2 --steps 3 --deadline 290 --out $OUT/table 2>&1 | grep "^|\|^#" | tail -50
