"""Real `longrope serve` processes on loopback, started once per session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.probe import free_port, wait_until_ok

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-1"


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    log: Path

    @property
    def v1(self) -> str:
        return f"{self.base}/v1"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 400) -> Server:
    port = free_port()
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})}
    full_env.pop("LONGROPE_FACTORS", None)
    handle = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rope_ext.cli", "serve", "--port", str(port), *args],
        cwd=REPO, env=full_env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
    )
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    if not wait_until_ok(f"{server.base}/health", proc, timeout=timeout):
        stop_server(server)
        raise AssertionError(f"longrope serve did not become healthy:\n{server.log_text()[-6000:]}")
    return server


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


@pytest.fixture(scope="session")
def smollm2_server(smollm2_dir, tmp_path_factory):
    """The default model with its shipped ladder, float32 and eager (matches transformers), keyed."""
    log = tmp_path_factory.mktemp("server") / "smollm2.log"
    server = start_server(
        ["--model", str(smollm2_dir), "--served-model-name", "smollm2", "--api-key", API_KEY,
         "--api-key", "test-key-2", "--max-body-bytes", "200000", "--dtype", "float32", "--enforce-eager",
         "--seed", "0"],
        log,
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def tiny_server(tiny_model, tmp_path_factory):
    """The tiny Llama (W0 = 256) with its three-step ladder, policy dynamic: promotions happen."""
    model_dir, factors, _ = tiny_model
    log = tmp_path_factory.mktemp("server") / "tiny.log"
    server = start_server(
        ["--model", str(model_dir), "--factors", str(factors), "--served-model-name", "tiny", "--dtype", "float32",
         "--enforce-eager", "--max-model-len", "1024", "--seed", "0", "--drain-timeout", "60"],
        log, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    yield server
    stop_server(server)
