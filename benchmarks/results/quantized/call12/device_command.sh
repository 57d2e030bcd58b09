# issue 21, twelfth session, main's final code (call11's A/Bs applied: LoCO's plain-op rotation, LoCA's Triton rows
# in eager code only): the 8-layer table at both batch shapes, eager and compiled, then the GPU tests.
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/src:$PWD/.carry/lmq/b/bnb PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
timeout 320 python3 benchmarks/quantized.py --sections main --batches 1x2048,4x1024 --modes eager,compiled --warmup 2 --steps 3 --deadline 290 --out $OUT 2>&1 | grep "^|\|^#" | tail -50
timeout 250 python3 -m pytest -q -m gpu tests/training/test_gpu.py -p no:cacheprovider --tb=short > $OUT/gpu_tests.log 2>&1; tail -25 $OUT/gpu_tests.log
