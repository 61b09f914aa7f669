#!/usr/bin/env bash
# The paper-scale `longrope search` (population 64, 40 iterations, --search-scale, bfloat16, in
# LongRoPE2's space scored on whole documents: --mode v2 --fitness ppl, as the shipped sets) at
# 16384 then 32768 tokens on a lent GPU host: torch and transformers, no network, no vLLM.
# Run from the repository root there, in two calls that scripts/gpu/pack.sh prepares and prints:
#   stage   call 1 (carries .gpu/stage): the GGUF's first half and the wheels go to $ROOT.
#   search  call 2 (carries .gpu/search), made at once: the host keeps /tmp ~30 s after a call.
#           Joins the GGUF and checks its sha256, installs the wheels into $ROOT/site, prepares
#           the model (`longrope prepare-model --gguf`), searches each window (16384 first, so a
#           call that runs out of time still leaves one result) and writes to $OUT:
#           gpu-search.tar.gz (gpu/: per window the factor file, log, summary and cache, plus
#           device.log and nvidia-smi.txt) and device.log. Every step already done is skipped, so
#           calling search again while the host is warm resumes: each search replays its cache.
# Settings (their defaults are the GPU run; tests/scripts/test_gpu_search.py shrinks them):
#   LONGROPE_GPU_ROOT /tmp/longrope-gpu   LONGROPE_GPU_PACK .gpu   LONGROPE_GPU_PYTHON python3
#   LONGROPE_GPU_DEVICE cuda   LONGROPE_GPU_WINDOWS "16384 32768"
#   LONGROPE_GPU_SEARCH_ARGS   more `longrope search` flags (none: the paper's population)
#   LONGROPE_GPU_LAMBDA_MIN    "16384=2.25": per window, the critical dimensions' least λ
#                              (`--lambda-min`; a window not named: s), as the shipped sets:
#                              the 16k set keeps a 1.125·s margin its farthest keys need, the 32k
#                              set sits at s (its margin cost 5 % perplexity)
#   LONGROPE_GPU_MODEL         a prepared model directory (none: prepared here from the GGUF)
#   LONGROPE_GPU_DEADLINE_S    560: seconds after the call starts at which a search is stopped
#                              (SIGINT), so a call of 600 s still packs what it found
# Exit status of search: 0 every window searched; 4 stopped at the deadline (call it again while
# warm to go on); 3 refused (part 1 or the wheels missing, the GGUF's sha256 wrong); else failed.
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/../.."

ROOT=${LONGROPE_GPU_ROOT:-/tmp/longrope-gpu}
PACK=${LONGROPE_GPU_PACK:-.gpu}
PY=${LONGROPE_GPU_PYTHON:-python3}
DEVICE=${LONGROPE_GPU_DEVICE:-cuda}
WINDOWS=${LONGROPE_GPU_WINDOWS:-16384 32768}
DEADLINE_S=${LONGROPE_GPU_DEADLINE_S:-560}
LAMBDA_MIN=${LONGROPE_GPU_LAMBDA_MIN-16384=2.25}
RESULTS=$ROOT/gpu
export PYTHONPATH="$ROOT/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_ROOT_USER_ACTION=ignore  # no network here

die() {
  echo "error: $*" >&2
  exit 3
}

mark() {  # a timing line: wall clock and seconds since the call started
  echo "== $(date -u +%H:%M:%S) +$(($(date +%s) - LONGROPE_GPU_STARTED))s $*"
}

stage() {  # a fresh start, but for the results of earlier calls (their caches resume the searches)
  mkdir -p "$ROOT"
  find "$ROOT" -mindepth 1 -maxdepth 1 ! -name gpu -exec rm -rf {} +
  cp "$PACK/stage/model.gguf.part1" "$ROOT/"
  cp -r "$PACK/stage/wheels" "$ROOT/wheels"
  echo "staged in $ROOT: model.gguf.part1 ($(stat -c %s "$ROOT/model.gguf.part1") bytes)," \
    "$(find "$ROOT/wheels" -name '*.whl' | wc -l) wheels"
  echo "now make call 2 (bash scripts/gpu/device.sh search) at once: $ROOT lasts only while the host stays warm"
}

join_gguf() {
  local gguf=$ROOT/model.gguf want got
  want=$(cut -d' ' -f1 "$PACK/search/model.gguf.sha256")
  if [ -f "$gguf" ]; then
    got=$(sha256sum "$gguf" | cut -d' ' -f1)
    [ "$want" = "$got" ] || die "$gguf was joined from another pack: make call 1, then call 2 at once"
    echo "GGUF: $gguf (joined by an earlier call)"
    return
  fi
  [ -f "$ROOT/model.gguf.part1" ] || die "$ROOT/model.gguf.part1 is missing: call 1 (device.sh stage) did not" \
    "run on this host, or the host went back since; make call 1, then call 2 at once"
  cat "$ROOT/model.gguf.part1" "$PACK/search/model.gguf.part2" >"$gguf.tmp"
  got=$(sha256sum "$gguf.tmp" | cut -d' ' -f1)
  if [ "$want" != "$got" ]; then
    rm -f "$gguf.tmp"
    die "the joined GGUF's sha256 is $got, not $want: its parts come from different packs;" \
      "run scripts/gpu/pack.sh again and make both calls"
  fi
  mv "$gguf.tmp" "$gguf"
  rm -f "$ROOT/model.gguf.part1"
  echo "GGUF: $gguf, sha256 $got"
}

install_wheels() {
  local site=$ROOT/site wheels
  shopt -s nullglob
  wheels=("$ROOT"/wheels/*.whl)
  shopt -u nullglob
  [ ${#wheels[@]} -gt 0 ] || die "no wheels in $ROOT/wheels: make call 1 (device.sh stage) first"
  if [ ! -f "$site/.installed" ]; then
    rm -rf "$site"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --target "$site" "${wheels[@]}"
    touch "$site/.installed"
  fi
  WHEEL_NAMES=()
  for wheel in "${wheels[@]}"; do
    wheel=${wheel##*/}
    WHEEL_NAMES+=("${wheel%%-*}")
  done
}

preflight() {  # everything the search imports loads, from where it should, and the device is there
  "$PY" - "$DEVICE" "${WHEEL_NAMES[@]}" <<'EOF'
import importlib
import importlib.metadata
import sys

import torch
import transformers

device, carried = sys.argv[1], sys.argv[2:]
for module in ("longrope.cli", "rope_ext.research.evaluation", "rope_ext.research.search_run", "rope_ext.models.smollm2", "gguf"):
    importlib.import_module(module)
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
for name in carried:
    dist = importlib.metadata.distribution(name)
    print(f"  carried: {dist.metadata['Name']} {dist.version} from {dist.locate_file('')}")
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("error: the search runs on cuda, but torch sees no GPU")
    props = torch.cuda.get_device_properties(0)
    print(f"  {props.name}: {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
EOF
}

attention_check() {  # whether the search's attention call (no mask, causal, GQA, bf16) gets the flash kernel
  "$PY" - "$1" <<'EOF'
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

config = json.loads((Path(sys.argv[1]) / "config.json").read_text())
heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
head_dim = config.get("head_dim") or config["hidden_size"] // heads
q = torch.randn(1, heads, 1024, head_dim, device="cuda", dtype=torch.bfloat16)
kv = torch.randn(1, kv_heads, 1024, head_dim, device="cuda", dtype=torch.bfloat16)
try:
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    print(f"attention ({heads} heads, {kv_heads} KV heads, head dim {head_dim}, bf16, causal): flash kernel")
except RuntimeError as exc:
    print(f"attention: no flash kernel, SDPA picks another ({str(exc).splitlines()[0]})")
EOF
}

summarize() {  # one line per window, from the search's log
  "$PY" - "$@" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

stem, window, wall, rc = sys.argv[1:]
log = Path(stem + ".log.jsonl")
rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
timed = [r["seconds"] for r in rows if r["seconds"] > 0]
line = f"window {window}: exit {rc}, {wall} s, {len(rows)} evaluations ({len(rows) - len(timed)} from the cache)"
if timed:
    line += f"; seconds per evaluation: first {timed[0]:.3f}, median {statistics.median(timed):.3f}"
if rows:
    best = min(rows, key=lambda r: r["ppl"])
    line += f"; best ppl {best['ppl']:.4f} ({best['origin']}, iteration {best['iteration']})"
print(line)
EOF
}

pack_results() {  # $OUT gets at most 8 files back: one archive of everything, and the log to read at once
  tar -czf "$ROOT/gpu-search.tar.gz" -C "$ROOT" gpu
  cp "$ROOT/gpu-search.tar.gz" "$RESULTS/device.log" "$OUT/"
}

lambda_min_flag() {  # `--lambda-min X` when LAMBDA_MIN names window $1; nothing (λ from s) when not
  local pair
  for pair in $LAMBDA_MIN; do
    if [[ ${pair%%=*} == "$1" ]]; then echo "--lambda-min ${pair#*=}"; fi
  done
}

search_steps() {
  local model window stem name="" left start rc=0
  mark "longrope GPU search: windows $WINDOWS on $DEVICE, ${LONGROPE_GPU_SEARCH_ARGS:-paper population}"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi | tee "$RESULTS/nvidia-smi.txt" || echo "nvidia-smi failed"
  else
    echo "nvidia-smi: not on this host"
  fi
  join_gguf
  install_wheels
  mark "wheels installed in $ROOT/site"
  preflight
  if [ -n "${LONGROPE_GPU_MODEL:-}" ]; then
    model=$LONGROPE_GPU_MODEL
  else  # named as the model, since factor files record the directory's name
    model=$ROOT/$("$PY" -c 'from rope_ext.models.smollm2 import DEFAULT_MODEL_NAME; print(DEFAULT_MODEL_NAME)')
    "$PY" -m longrope prepare-model --gguf "$ROOT/model.gguf" --out "$model"
  fi
  mark "model ready: $model"
  [[ $DEVICE != cuda* ]] || attention_check "$model"
  for window in $WINDOWS; do
    stem=$RESULTS/smollm2-long-$window
    # Named as the shipped ladder's sets (long, then long-32k), so `longrope factors merge` takes them.
    if [ -z "$name" ]; then name=long; else name=long-$((window / 1024))k; fi
    left=$((DEADLINE_S - ($(date +%s) - LONGROPE_GPU_STARTED)))
    if ((left < 30)); then
      echo "window $window: not started, ${left} s left before the deadline"
      return 4
    fi
    if [ ! -f "$stem.cache.jsonl" ] && [ -f "$PACK/search/resume/${stem##*/}.cache.jsonl" ]; then
      cp "$PACK/search/resume/${stem##*/}.cache.jsonl" "$stem.cache.jsonl"
      echo "window $window: resuming from the carried cache"
    fi
    mark "search at $window, stopped after $left s at the latest"
    start=$(date +%s)
    # shellcheck disable=SC2046,SC2086  # the extra flags are words
    timeout --signal=INT --kill-after=20 "$left" "$PY" -m longrope search --model "$model" \
      --window "$window" --data "$PACK/search/books" --device "$DEVICE" --dtype bfloat16 --search-scale \
      --mode v2 --fitness ppl $(lambda_min_flag "$window") \
      --name "$name" -o "$stem.json" ${LONGROPE_GPU_SEARCH_ARGS:-} || rc=$?
    summarize "$stem" "$window" "$(($(date +%s) - start))" "$rc"
    pack_results
    if ((rc == 124 || rc == 137)); then  # exit 4: the device tool reads 124 and 137 as its own limit
      echo "window $window: stopped at the deadline; its cache keeps every finished evaluation:" \
        "call search again at once (the host is warm) to go on"
      return 4
    fi
    ((rc == 0)) || return "$rc"
  done
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  fi
  mark "done"
}

case "${1:-}" in
  stage)
    stage
    ;;
  search)
    : "${OUT:?set OUT to the folder whose files come back}"
    export LONGROPE_GPU_STARTED=${LONGROPE_GPU_STARTED:-$(date +%s)}
    mkdir -p "$RESULTS"
    # The steps run in a child bash (errexit intact there) whose output also goes to device.log.
    status=0
    bash "$SELF" search-steps 2>&1 | tee -a "$RESULTS/device.log" || status=$?
    pack_results
    exit "$status"
    ;;
  search-steps)
    search_steps
    ;;
  *)
    echo "usage: $0 stage|search (see the comment at the top)" >&2
    exit 2
    ;;
esac
