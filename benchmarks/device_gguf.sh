#!/usr/bin/env bash
# On the GPU machine: reassemble the SmolLM2 GGUF at /root/SmolLM2-135M-Instruct.Q4_1.gguf from its xz parts
# (those left in /root by earlier calls on the same warm machine, device_call1.sh / device_stash.sh, plus ASSETS'
# own: device_assets.py's c/), check its sha256, and install ASSETS' wheels into /root/site.
# Usage: bash benchmarks/device_gguf.sh ASSETS
set -euo pipefail
assets=$1
gguf=/root/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $gguf ]; then
  bash "$(dirname "$0")/device_stash.sh" "$assets"
  python3 - "$assets/gguf.sha256" $gguf /root/smollm2.gguf.xz.part* <<'PY' || { echo "the GGUF's parts are incomplete: the machine was not warm"; exit 4; }
import hashlib, lzma, sys
data = lzma.decompress(b"".join(open(p, "rb").read() for p in sorted(sys.argv[3:])))
digest = hashlib.sha256(data).hexdigest()
assert digest == open(sys.argv[1]).read().strip(), digest
open(sys.argv[2], "wb").write(data)
print("SmolLM2 GGUF reassembled, sha256", digest)
PY
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/site "$assets"/*.whl
