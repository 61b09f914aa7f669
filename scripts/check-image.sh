#!/usr/bin/env bash
# Builds the Dockerfile's `cpu` target with podman and proves the image serves, run with its
# default command as a user would: healthy within 5 minutes, "Paris" at temperature 0, JSON that
# follows a response_format schema, a stream that ends with [DONE], longrope_ metrics by
# rope_set on /metrics, uid 10001, its HEALTHCHECK passing, and SIGTERM stopping it with exit
# status 0 within the drain timeout. Exits non-zero when the image does not build or any check
# fails; removes the container and the image it made (LONGROPE_KEEP_IMAGE=1 keeps the image).
#
# Needs no Docker engine and no image registry: podman and mmdebstrap come from Debian (installed
# when missing). When the official base (python:3.11-slim-bookworm) cannot be pulled, a stand-in
# with the same Python is made from Debian's packages. The build uses this host's pip
# configuration (whatever `pip config list` names: index, mirrors, wheel folders, CA bundle), so it
# works behind a mirror or proxy. No host configuration file is changed: podman's runtime and
# ulimits are given on its command line.
set -euo pipefail
cd "$(dirname "$0")/.."

image=${LONGROPE_IMAGE:-localhost/longrope-serve:cpu-check}
official_base=docker.io/library/python:3.11-slim-bookworm
standin_base=localhost/longrope-python-standin:3.11-bookworm
container=longrope-check-$$
drain=30
work=$(mktemp -d)
started=$(date +%s)
say() { echo "[check-image $(($(date +%s) - started))s] $*"; }

missing=()
command -v podman >/dev/null || missing+=(podman runc)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Explicit ulimits within this host's own: podman's defaults exceed what a sandbox may set.
limit() { local hard; hard=$(ulimit -H "$1"); [ "$hard" = unlimited ] && hard=$2; echo $((hard < $2 ? hard : $2)); }
nofile=$(limit -n 65536)
nproc=$(limit -u 16384)
podman=(podman --runtime runc)
ulimits=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")

cleanup() {
  "${podman[@]}" rm -f -t 0 "$container" >/dev/null 2>&1 || true
  [ "${LONGROPE_KEEP_IMAGE:-0}" = 1 ] || "${podman[@]}" rmi -f "$image" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# ---- base image ----
if timeout 60 "${podman[@]}" pull -q "$official_base" >/dev/null 2>&1; then
  base=$official_base
else
  base=$standin_base
  if ! "${podman[@]}" image exists "$base"; then
    say "no registry: making a stand-in for $official_base with mmdebstrap"
    # Debian bookworm's Python is 3.11, as in the official image; like it, the stand-in has the
    # headers, `python` and `pip` on PATH, and lets pip install into the system Python.
    mmdebstrap --quiet --variant=minbase \
      --include=python3,python3-pip,python3-venv,python3-dev,python-is-python3,ca-certificates \
      --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED; ln -sf pip3 "$1"/usr/bin/pip' \
      bookworm "$work/base.tar"
    "${podman[@]}" import -q --change 'CMD ["python3"]' "$work/base.tar" "$base" >/dev/null
    rm -f "$work/base.tar"
  fi
fi
say "base image: $base"

# ---- this host's pip configuration, for the build's RUN steps ----
pip_mounts=(--volume "$work/pip.conf:/etc/pip.conf:ro")
while IFS= read -r path; do
  pip_mounts+=(--volume "$path:$path:ro")
done < <(python3 scripts/pip_config_for_build.py "$work/pip.conf")
torch_index=$(bash scripts/torch-index.sh python3)

# ---- build ----
say "building the cpu target (torch index: ${torch_index:-none, pip config provides torch})"
build_start=$(date +%s)
"${podman[@]}" build --format docker --network host "${ulimits[@]}" "${pip_mounts[@]}" \
  --target cpu --build-arg "PYTHON_IMAGE=$base" --build-arg "TORCH_INDEX_URL=$torch_index" \
  -t "$image" . >"$work/build.log" 2>&1 || { tail -60 "$work/build.log"; say "FAIL: the image does not build"; exit 1; }
say "built in $(($(date +%s) - build_start))s, $("${podman[@]}" image inspect -f '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1/1e9}')"

# ---- run with the default command; a loopback port the HEALTHCHECK must follow ----
port=$(python3 -c 'from harness.servers import free_port; print(free_port())')
run_start=$(date +%s)
# (podman logs errors when it finds no systemd to time health checks with; they change nothing:
# the HEALTHCHECK is run by hand below)
"${podman[@]}" run -d --name "$container" --network host --shm-size 1g "${ulimits[@]}" \
  -e LONGROPE_HOST=127.0.0.1 -e LONGROPE_PORT="$port" -e LONGROPE_SHUTDOWN_TIMEOUT="$drain" "$image" \
  >/dev/null 2>"$work/run.log" || { cat "$work/run.log"; say "FAIL: the container does not start"; exit 1; }
fail() { "${podman[@]}" logs --tail 80 "$container" 2>&1 || true; say "FAIL: $*"; exit 1; }

python3 - "$port" "$run_start" <<'EOF' || fail "the server did not serve as expected"
"""The HTTP checks, with the standard library alone (the host needs no client packages)."""
import json
import sys
import time
import urllib.request

from harness.servers import wait_until_ok

base, started = f"http://127.0.0.1:{sys.argv[1]}", float(sys.argv[2])


def get(path: str) -> str:
    with urllib.request.urlopen(base + path, timeout=30) as response:
        return response.read().decode()


def post(path: str, body: dict) -> list[str]:
    request = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return response.read().decode().splitlines()


if not wait_until_ok(base + "/health", timeout=started + 300 - time.time(), interval=2):
    sys.exit("not healthy within 5 minutes")
print(f"healthy {time.time() - started:.0f}s after start")
model = json.loads(get("/v1/models"))["data"][0]["id"]
question = {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": 20}
answer = json.loads("".join(post("/v1/chat/completions", question)))["choices"][0]["message"]["content"]
print("answer:", answer)
assert "Paris" in answer, answer
schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
structured = {**question, "max_tokens": 40,
              "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}
content = json.loads("".join(post("/v1/chat/completions", structured)))["choices"][0]["message"]["content"]
assert isinstance(json.loads(content)["capital"], str), content
print("structured output:", content)
lines = [line for line in post("/v1/chat/completions", {**question, "stream": True}) if line]
assert lines[-1] == "data: [DONE]" and len(lines) > 2, lines[-3:]
metrics = [line for line in get("/metrics").splitlines() if line.startswith("longrope_") and 'rope_set="' in line]
assert metrics, "no longrope_ metric by rope_set on /metrics"
print(f"stream of {len(lines)} events ends with [DONE]; {len(metrics)} longrope_ series by rope_set")
EOF

uid=$("${podman[@]}" exec "$container" id -u)
[ "$uid" = 10001 ] || fail "runs as uid $uid, not 10001"
"${podman[@]}" healthcheck run "$container" >/dev/null || fail "the image's HEALTHCHECK does not pass"
say "uid 10001; HEALTHCHECK passes"

stop_start=$(date +%s)
"${podman[@]}" kill --signal TERM "$container" >/dev/null 2>&1
status=$(timeout $((drain + 30)) "${podman[@]}" wait "$container" 2>/dev/null) || fail "still running $((drain + 30))s after SIGTERM"
waited=$(($(date +%s) - stop_start))
[ "$status" = 0 ] || fail "SIGTERM ended it with exit status $status"
[ "$waited" -le "$drain" ] || fail "SIGTERM took ${waited}s, more than the drain timeout (${drain}s)"
say "SIGTERM: exit 0 after ${waited}s"
say "PASS"
