# issue 21, thirteenth session: HRA r8's bf16 rotation on the NF4 base (since call14) at 4 x 1024, the shape call14
# left out, against peft LoRA r16 in the same process, eager and compiled.
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/src:$PWD/.carry/lmq/b/bnb PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
timeout 280 python3 benchmarks/quantized.py --sections main --only "peft LoRA r16,HRA r8" --compiled-methods "peft LoRA r16,HRA r8" --batches 4x1024 --modes eager,compiled --warmup 2 --steps 3 --deadline 250 --out $OUT 2>&1 | grep "^|\|^#" | tail -20
