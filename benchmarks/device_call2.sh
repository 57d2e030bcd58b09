#!/usr/bin/env bash
# GPU call 2 of the evaluation table (see benchmarks/device_assets.py): the causal-LM task.
# Runs inside the carried folder b/; needs the GGUF's first part that call 1 left on the (still
# warm) machine. Usage: bash device_call2.sh DEADLINE_SECONDS [quality.py options...]
set -uo pipefail
cd "$(dirname "$0")"
deadline=$1; shift
part1=/root/smollm2.gguf.xz.part1
[ -f $part1 ] || part1=../a/smollm2.gguf.xz.part1
[ -f $part1 ] || { echo "the GGUF's first part is gone: the machine was not warm; call 1 must run again"; exit 3; }
python3 - "$part1" <<'PY' || exit 4
import hashlib, lzma, sys
data = lzma.decompress(open(sys.argv[1], "rb").read() + open("smollm2.gguf.xz.part2", "rb").read())
digest = hashlib.sha256(data).hexdigest()
assert digest == open("gguf.sha256").read().strip(), digest
open("/root/SmolLM2-135M-Instruct.Q4_1.gguf", "wb").write(data)
print("SmolLM2 GGUF reassembled, sha256", digest)
PY
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/site gguf-*.whl || exit 5
export PYTHONPATH=$PWD/src:/root/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export ORTHOTUNE_CACHE=/root/ot-cache ORTHOTUNE_SMOLLM2_GGUF=/root/SmolLM2-135M-Instruct.Q4_1.gguf
# dequantise once here, not in every worker at the same time
python3 -c "from orthotune.recipes.assets import smollm2_path; print('SmolLM2 folder', smollm2_path())" 2>&1 | grep -v "Loading weights" || exit 6
d=$PWD/lm-data
timeout $((deadline + 40)) python3 benchmarks/quality.py --tasks lm --workers 10 --threads 1 --deadline "$deadline" \
  --out "$OUT" --tag call2 --scratch /root/bench --set lm:data.source=jsonl --set "lm:data.train_path=$d/train.jsonl" \
  --set "lm:data.val_path=$d/val.jsonl" --set "lm:data.test_path=$d/test.jsonl" "$@" 2>&1 | grep -v "Loading weights" | tee "$OUT/log_call2.txt"
[ -f /root/bench/lm/lora/test-0/curves.png ] && cp /root/bench/lm/lora/test-0/curves.png "$OUT/lm_curves_lora.png"
ls -la "$OUT"
