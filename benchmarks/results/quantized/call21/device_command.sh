# issue 21, sixteenth session (not run yet: no GPU was lent): the memory-vs-size sweep (1B, 3B, 8B Llama-3 shapes at
# full depth, batch 1 x 2048, eager) on main, each library with its own prepare_model_for_kbit_training, plus peft
# LoRA on orthotune's preparation; it replaces the plot of call 2 (../memory_vs_size.png: peft LoRA and OFT b32 only,
# before the adapters' memory work and the bf16 embeddings/head). Carry .carry/lmq/b/bnb.
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/src:$PWD/.carry/lmq/b/bnb PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
timeout 560 python3 benchmarks/quantized.py --sections sizes --size-methods "peft LoRA r16,LoRA r16,LoCO,OFT b32" --warmup 2 --steps 2 --deadline 480 --out $OUT 2>&1 | grep "^|\|^#\|deadline\|Error" | tail -40
