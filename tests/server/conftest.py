"""Real `longrope serve` processes on loopback, started once per session (helpers in tests/helpers.py)."""

from __future__ import annotations

import pytest

from rope_ext.models.tiny import TINY_MAX_LEN
from tests.helpers import assert_runner, start_server, stop_server

API_KEY = "test-key-1"


@pytest.fixture(scope="session")
def smollm2_server(smollm2_dir, tmp_path_factory):
    """The default model with its shipped ladder, float32 and eager (matches transformers), keyed, with
    vLLM's hermes tool parser (so `--enable-auto-tool-choice --tool-call-parser hermes` is proven too)."""
    log = tmp_path_factory.mktemp("server") / "smollm2.log"
    server = start_server(
        ["--model", str(smollm2_dir), "--served-model-name", "smollm2", "--api-key", API_KEY, "test-key-2",
         "--max-body-bytes", "200000", "--dtype", "float32", "--enforce-eager", "--seed", "0",
         "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
        log,
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def tiny_server(tiny_model, vllm_runner, tmp_path_factory):
    """The tiny Llama (W0 = 256) with its three-step ladder, policy dynamic: promotions happen, prepared by side
    prefills; the window start rule, so that where a request starts does not hang on the measured rates."""
    model_dir, factors, _ = tiny_model
    log = tmp_path_factory.mktemp("server") / "tiny.log"
    server = start_server(
        ["--model", str(model_dir), "--factors", str(factors), "--served-model-name", "tiny", "--dtype", "float32",
         "--enforce-eager", "--max-model-len", str(TINY_MAX_LEN), "--seed", "0", "--shutdown-timeout", "60",
         "--rope-start-rule", "window"],
        log, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert_runner(server, vllm_runner)
    yield server
    stop_server(server)
