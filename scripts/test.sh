#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) plus Debian's prometheus (the metrics tests scrape the
# live server with a real Prometheus), then runs the whole test suite under the model runner vLLM
# picks on this CPU (V1), and the engine tests again under vLLM's V2 model runner, its Triton kernels
# in Triton's interpreter (harness/v2_on_cpu.py): all but SmolLM2's, whose 49152-token vocabulary makes
# the interpreted sampling kernels take minutes (the tiny models prove the same under V2), and stock
# vLLM's own run (plugin off: nothing of ours runs in it). With arguments, only `pytest ARGS` runs (add
# --vllm-runner V2 for the V2 runner).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest --durations=25
exec .venv/bin/python -m pytest --durations=15 -m engine --vllm-runner V2 --deselect tests/rope_ext/vllm_plugin/test_real_model.py \
  --deselect tests/rope_ext/vllm_plugin/test_mixed_batch.py::test_stock_vllm_gives_short_requests_other_results
