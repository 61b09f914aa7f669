"""Fixtures for the engine tests: one shared plugin engine over every wave of the selftest workload."""

from __future__ import annotations

import pytest

from tests.helpers import run_engine


@pytest.fixture(scope="session")
def plugin_engine(tiny_engine_model, vllm_runner, tmp_path_factory) -> dict:
    """Every wave of rope_ext/selftest/workload.py through one compiled float32 engine with the plugin.

    Returns {"results": per request, "metrics": engine counters, "groups": name -> request indices,
    "requests": the requests}.
    """
    from rope_ext.selftest.workload import ENGINE, engine_spec

    model_dir, factors, _ = tiny_engine_model
    spec, groups = engine_spec(str(model_dir), ENGINE)
    out = run_engine(spec, {"LONGROPE_FACTORS": str(factors)}, tmp_path_factory.mktemp("plugin"), "plugin",
                     vllm_runner)
    return {**out, "groups": groups, "requests": spec["requests"]}
