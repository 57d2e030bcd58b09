#!/usr/bin/env bash
# GPU call of issue 21's quality check: the causal-LM recipe (SmolLM2-135M-Instruct, arithmetic) on a bf16
# base and on a bitsandbytes NF4 base (bf16 compute), LoRA / LoCO / OFT at the table's budget, 3 seeds
# each, every run in one call, from the repository root. ASSETS is a carried folder in the layout of
# benchmarks/device_assets.py's c/ (the GGUF's last part, gguf.sha256, the gguf, datasets, dill and multiprocess
# wheels: the recipe reads JSON lines through datasets, which the GPU image lacks; lm-data/ JSONL) plus bnb/ (the
# bitsandbytes package with only its CPU and CUDA 13 libraries: the wheel is 42 MB); the GGUF's earlier parts must
# be in /root from the calls before, on the same warm machine (benchmarks/device_gguf.sh).
# Usage: [RESUME=DIR] [BASES="bf16 nf4"] bash benchmarks/device_lm_quant.sh ASSETS DEADLINE_SECONDS [METHODS [QUALITY_ARGS...]]
# BASES: the bases to run (both by default). RESUME=DIR continues each base's session from DIR/quality_lm_{bf16,nf4}.json (e.g. with more --seeds).
# SCRATCH: the folder for the runs' scratch folders (/root; two calls of this script at once need two).
# NF4_ARGS: further quality.py arguments for the NF4 base only (e.g. "--set lm:model.loftq=true", which a bf16 base refuses).
# LM_DATA: the data folder in ASSETS (lm-data, the recipe's splits, by default; e.g. lm-data-2000 from
# benchmarks/lm_data.py --eval-size 2000): data.eval_size is then set to its test file's line count.
# e.g. bash benchmarks/device_lm_quant.sh .carry/lmq/c 200 loco --lr loco=3e-3   (METHODS: "lora loco oft" by default)
set -uo pipefail
cd "$(dirname "$0")/.."
assets=$1 deadline=$2
read -r -a methods <<< "${3:-lora loco oft}"
extra=("${@:4}")
bash benchmarks/device_gguf.sh "$assets" || exit 4
export PYTHONPATH=$PWD/src:$assets/bnb:/root/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # many processes share the card: no cached fragments
export ORTHOTUNE_CACHE=/root/ot-cache ORTHOTUNE_SMOLLM2_GGUF=/root/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -c "import bitsandbytes, torch; print('bitsandbytes', bitsandbytes.__version__, 'torch', torch.__version__)" || exit 6
python3 -c "from orthotune.recipes.assets import smollm2_path; print('SmolLM2 folder', smollm2_path())" 2>&1 | grep -v "Loading weights" || exit 7
d=$PWD/$assets/${LM_DATA:-lm-data}
[ -f "$d/test.jsonl" ] || { echo "no data folder $d"; exit 8; }
data=(--set "lm:data.train_file=$d/train.jsonl" --set "lm:data.validation_file=$d/val.jsonl" --set "lm:data.test_file=$d/test.jsonl")
if [ -n "${LM_DATA:-}" ]; then data+=(--set "lm:data.eval_size=$(wc -l < "$d/test.jsonl")"); fi
for base in ${BASES:-bf16 nf4}; do
  if [ $base = bf16 ]; then model=(--set lm:model.dtype=bfloat16); else model=(--set lm:model.quantization=nf4 --set lm:model.compute_dtype=bfloat16); fi
  if [ -n "${RESUME:-}" ]; then model+=(--resume "$RESUME/quality_lm_$base.json"); fi
  if [ $base = nf4 ] && [ -n "${NF4_ARGS:-}" ]; then read -r -a nf4_args <<< "$NF4_ARGS"; model+=("${nf4_args[@]}"); fi
  timeout $((deadline + 40)) python3 benchmarks/quality.py --tasks lm --methods "${methods[@]}" --no-sweep "${extra[@]}" --workers 9 --threads 1 \
    --set lm:train.compile=false \
    --deadline "$deadline" --out "$OUT" --tag "lm_$base" --scratch "${SCRATCH:-/root}/bench_$base" "${data[@]}" "${model[@]}" 2>&1 \
    | grep -v "Loading weights" > "$OUT/log_lm_$base.txt" &
done
wait
tail -n 25 "$OUT"/log_lm_*.txt
