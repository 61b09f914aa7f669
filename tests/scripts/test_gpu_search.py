"""scripts/gpu/: pack.sh, then device.sh's two calls (stage, search), made tiny and CPU-only.

What the GPU run needs besides a GPU is exercised here: the GGUF split in two and joined
back under its sha256, wheels installed into a target folder that the search's Python sees
first, the preflight, every window searched in order with `--search-scale --dtype bfloat16`,
and $OUT holding one archive of every result plus the log. The tiny random model stands in
for SmolLM2 (LONGROPE_GPU_MODEL, so no preparing), a few random bytes for the GGUF, and a
wheel built here for the carried ones (pack.sh downloads the real ones, which needs the
network). Preparing from an explicit GGUF is tests/rope_ext/models/test_smollm2.py's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from rope_ext.factors import load_ladder
from rope_ext.models.tiny import TINY_MAX_LEN, TINY_W0
from tests.helpers import REPO

pytestmark = pytest.mark.slow

WINDOWS = (2 * TINY_W0, TINY_MAX_LEN)
TINY_SEARCH = "--population 4 --iterations 1 --parents 2 --mutations 1 --crossovers 1"
MARGIN = 2.25  # the first window's least critical λ, as the shipped 16k set's; the second stays at s


def _probe_wheel(folder: Path) -> Path:
    """A pure-Python wheel of one empty package: what pip needs, nothing more."""
    info = "longrope_gpu_probe-1.0.dist-info"
    files = {"longrope_gpu_probe/__init__.py": b"",
             f"{info}/METADATA": b"Metadata-Version: 2.1\nName: longrope-gpu-probe\nVersion: 1.0\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for name, data in files.items()) + f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "longrope_gpu_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return wheel


@pytest.fixture
def packed(tmp_path, tiny_model) -> dict:
    """pack.sh run into a temporary folder; the settings device.sh's calls get."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(os.urandom(100_001))  # odd: the halves differ by a byte
    pack = tmp_path / "pack"
    _probe_wheel(tmp_path / "wheels")
    env = {**os.environ, "PYTHON": sys.executable, "LONGROPE_GPU_PACK": str(pack), "LONGROPE_GPU_GGUF": str(gguf),
           "LONGROPE_GPU_WHEELS": str(tmp_path / "wheels")}
    result = subprocess.run(["bash", "scripts/gpu/pack.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bash scripts/gpu/device.sh stage" in result.stdout and "bash scripts/gpu/device.sh search" in result.stdout
    out, root = tmp_path / "out", tmp_path / "root"
    out.mkdir()
    device_env = {**os.environ, "OUT": str(out), "LONGROPE_GPU_ROOT": str(root), "LONGROPE_GPU_PACK": str(pack),
                  "LONGROPE_GPU_PYTHON": sys.executable, "LONGROPE_GPU_DEVICE": "cpu",
                  "LONGROPE_GPU_WINDOWS": " ".join(map(str, WINDOWS)), "LONGROPE_GPU_SEARCH_ARGS": TINY_SEARCH,
                  "LONGROPE_GPU_MODEL": str(tiny_model[0]), "LONGROPE_GPU_LAMBDA_MIN": f"{WINDOWS[0]}={MARGIN}"}
    return {"gguf": gguf, "pack": pack, "out": out, "root": root, "env": device_env}


def _device(step: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu/device.sh", step], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_two_calls_search_every_window_and_return_one_archive(packed):
    stage = _device("stage", packed["env"])
    assert stage.returncode == 0, stage.stdout + stage.stderr
    search = _device("search", packed["env"])
    assert search.returncode == 0, search.stdout + search.stderr
    root, out = packed["root"], packed["out"]
    assert (root / "model.gguf").read_bytes() == packed["gguf"].read_bytes()
    assert f"carried: longrope-gpu-probe 1.0 from {root / 'site'}" in search.stdout  # the target comes first

    assert sorted(p.name for p in out.iterdir()) == ["device.log", "gpu-search.tar.gz"]
    log = (out / "device.log").read_text()
    lines = [line for line in log.splitlines() if line.startswith("window ")]
    assert [line.split(":")[0] for line in lines] == [f"window {w}" for w in WINDOWS]  # in order, each finished
    assert all("exit 0" in line and "best ppl" in line for line in lines)
    with tarfile.open(out / "gpu-search.tar.gz") as tar:
        tar.extractall(packed["root"].parent / "back", filter="data")
    back = packed["root"].parent / "back" / "gpu"
    for window, name in zip(WINDOWS, ("long", f"long-{WINDOWS[1] // 1024}k"), strict=True):
        stem = back / f"smollm2-long-{window}"
        assert {p.name for p in back.glob(f"{stem.name}.*")} == {
            f"{stem.name}{suffix}" for suffix in (".json", ".log.jsonl", ".summary.json", ".cache.jsonl")}
        found = load_ladder(stem.with_suffix(".json")).sets[0]
        assert (found.name, found.window) == (name, window)
        summary = json.loads(stem.with_name(stem.name + ".summary.json").read_text())
        assert summary["config"]["population"] == 4 and summary["space"]["scale_bounds"] == [1.0, 1.5]
        assert {k: summary["arguments"][k] for k in ("device", "dtype", "search_scale", "mode", "fitness")} == {
            "device": "cpu", "dtype": "bfloat16", "search_scale": "True", "mode": "v2", "fitness": "ppl"}
        assert summary["space"]["mode"] == "v2"  # the shipped sets' space: critical dimensions at least s
        assert summary["space"]["bounds"][0] == (MARGIN if window == WINDOWS[0] else window / TINY_W0)
        assert min(found.factors[summary["space"]["critical"]:]) >= summary["space"]["bounds"][0]
    assert (back / "device.log").exists()

    # Called again while the host is warm: nothing is joined or installed twice, every evaluation replays.
    again = _device("search", packed["env"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "joined by an earlier call" in again.stdout
    replayed = re.findall(r"^window (\d+): exit 0, \d+ s, (\d+) evaluations \((\d+) from the cache\)",
                          again.stdout, re.MULTILINE)
    assert [int(w) for w, *_ in replayed] == list(WINDOWS)
    assert all(total == cached != "0" for _, total, cached in replayed)


@pytest.mark.parametrize("broken", ["no stage", "mismatched part"])
def test_search_refuses_a_gguf_it_cannot_trust(packed, broken):
    if broken == "mismatched part":
        assert _device("stage", packed["env"]).returncode == 0
        part = packed["pack"] / "search" / "model.gguf.part2"
        part.write_bytes(b"x" + part.read_bytes()[1:])
    search = _device("search", packed["env"])
    assert search.returncode == 3
    message = "make call 1, then call 2 at once" if broken == "no stage" else "its parts come from different packs"
    assert message in search.stderr + search.stdout
    assert not (packed["root"] / "model.gguf").exists()
    assert not list((packed["root"] / "gpu").glob("*.json"))
    assert (packed["out"] / "device.log").exists()  # what happened comes back even so
