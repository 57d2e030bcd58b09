# issue 21, twelfth session: main's table after LoCO's cores became (K, U, V) (its parameters and the small K of
# R = I + A K A^T: nothing width-sized held all step), LoCA's update took the base matmul's cast input and its
# rows came from one Triton kernel: the 8-layer table at both batch shapes, eager and compiled, then the GPU tests.
# bitsandbytes 0.50.2 carried in the ignored .carry/lmq/b/bnb.
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/src:$PWD/.carry/lmq/b/bnb PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
timeout 430 python3 benchmarks/quantized.py --sections main --batches 1x2048,4x1024 --modes eager,compiled --warmup 2 --steps 3 --deadline 400 --out $OUT 2>&1 | grep -v "^{" | tail -60
timeout 150 python3 -m pytest -q -m gpu tests/training/test_gpu.py -p no:cacheprovider > $OUT/gpu_tests.log 2>&1; tail -15 $OUT/gpu_tests.log
