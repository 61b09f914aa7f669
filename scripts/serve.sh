#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), prepares SmolLM2-135M-Instruct and serves it with its
# shipped ladder on 127.0.0.1:8000. Extra arguments go to `longrope serve` (and on to vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
# float32: on this CPU build, bfloat16 with torch.compile flips SmolLM2's close first tokens
# ("L'Étoile…" instead of "Paris"); later flags override (e.g. --dtype bfloat16 on a GPU).
exec .venv/bin/longrope serve --dtype float32 "$@"
