# issue 21, fifth session: LoCA's DCT rows computed per call (no d x d table) and its rank-n update in the base
# matmul's compute dtype on a 4-bit base; the 8-layer table at both batch shapes, eager and compiled, one H200 call.
# bitsandbytes 0.50.2 carried in the ignored .carry/s22/bnb (the venv's copy with only the CPU and CUDA 13.0 libraries)
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/src:$PWD/.carry/s22/bnb PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
timeout 585 python3 benchmarks/quantized.py --sections main --batches 1x2048,4x1024 --modes eager,compiled --warmup 2 --steps 3 --deadline 470 --out $OUT 2>&1 | grep -v "^{" | tail -60
