# issue 21, twelfth session, after call13 (the session's last device time): OFT and HRA (every SupportRotation) on a
# quantised base rotate in the frozen matmul's compute dtype too (bf16, one cast of the input shared with
# bitsandbytes), as LoCO since call13: peft LoRA r16, OFT b32, HRA r8 at 1 x 2048, eager and compiled.
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/src:$PWD/.carry/lmq/b/bnb PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
timeout 200 python3 benchmarks/quantized.py --sections main --only "peft LoRA r16,OFT b32,HRA r8" --compiled-methods "peft LoRA r16,OFT b32,HRA r8" --batches 1x2048 --modes eager,compiled --warmup 2 --steps 3 --deadline 170 --out $OUT 2>&1 | grep "^|\|^#" | tail -20
