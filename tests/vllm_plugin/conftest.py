"""Fixtures for the engine tests: an engine runner, the transformers reference, one shared plugin engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
def run_engine(spec: dict, env: dict[str, str], tmp_path: Path, name: str) -> dict:
    """Run tests/vllm_plugin/engine_run.py in a fresh process with ``env`` added."""
    spec_path, out_path = tmp_path / f"{name}-spec.json", tmp_path / f"{name}-out.json"
    spec_path.write_text(json.dumps(spec))
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **env}
    result = subprocess.run(
        [sys.executable, "-m", "tests.vllm_plugin.engine_run", str(spec_path), str(out_path)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise AssertionError(f"engine run {name} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return json.loads(out_path.read_text())


@pytest.fixture(scope="session")
def plugin_engine(tiny_model, tmp_path_factory) -> dict:
    """Every wave of tests/vllm_plugin/workload.py through one compiled float32 engine with the plugin.

    Returns {"results": per request, "metrics": engine counters, "groups": name -> request indices,
    "requests": the requests}.
    """
    from tests.vllm_plugin.workload import ENGINE, engine_spec

    model_dir, factors, _ = tiny_model
    spec, groups = engine_spec(str(model_dir), ENGINE)
    out = run_engine(spec, {"LONGROPE_FACTORS": str(factors)}, tmp_path_factory.mktemp("plugin"), "plugin")
    return {**out, "groups": groups, "requests": spec["requests"]}
