#!/usr/bin/env bash
# Copy what a device run needs (src, tests, benchmarks, pyproject) into the lead checkout's ignored
# .carry/<name>/ folder: the device tool sends that checkout, not this worktree.
set -euo pipefail
name=${1:-gpu}
src=$(cd "$(dirname "$0")/.." && pwd)
dst=/work/main/.carry/$name
rm -rf "$dst" && mkdir -p "$dst"
cp -r "$src/src" "$src/tests" "$src/benchmarks" "$src/pyproject.toml" "$dst/"
find "$dst" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$dst/benchmarks/results"
echo "$(git -C "$src" rev-parse --short HEAD)$(git -C "$src" diff --quiet HEAD || echo -dirty)" > "$dst/COMMIT"
du -sh "$dst"
