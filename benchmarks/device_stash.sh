#!/usr/bin/env bash
# Leave the SmolLM2 GGUF parts of carried folder DIR in /root, where device_call2.sh reassembles them on the
# same warm machine (device_assets.py splits the file over three calls). Usage: bash benchmarks/device_stash.sh DIR
set -euo pipefail
shopt -s nullglob
for part in "$1"/smollm2.gguf.xz.part*; do cp "$part" /root/; done
ls -la /root/ | grep smollm2.gguf.xz.part || echo "no GGUF part in $1 or /root"
