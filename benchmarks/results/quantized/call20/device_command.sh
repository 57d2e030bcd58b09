# issue 21, fifteenth session: the 8-layer table with each library's own prepare_model_for_kbit_training (peft's
# upcasts embeddings and head to float32; orthotune's, since the sixteenth session, the same but for the untied input
# embeddings, left in bf16 with a float32 output), plus peft LoRA on orthotune's preparation (the adapters alone).
# Carry .carry/lmq/b/bnb.
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/src:$PWD/.carry/lmq/b/bnb PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
timeout 400 python3 benchmarks/quantized.py --sections main --batches 1x2048,4x1024 --modes eager,compiled --warmup 2 --steps 3 --deadline 330 --out $OUT 2>&1 | grep "^|\|^#\|deadline\|Error" | tail -60
