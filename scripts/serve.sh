#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), prepares SmolLM2-135M-Instruct and serves it with its
# shipped ladder on 127.0.0.1:8000. Extra arguments go to `longrope serve` (and on to vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# 2 GiB holds one request of the ladder's 32768-token window (46,080 bytes a token in float32) and 13k more.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
# On CPU `longrope serve` runs float32 unless --dtype says otherwise (see server/serve.py).
exec .venv/bin/longrope serve "$@"
