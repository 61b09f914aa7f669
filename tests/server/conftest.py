"""Real `longrope serve` processes on loopback, started once per session."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from server.launch import ServerDidNotStart, ServerProcess, longrope_serve
from server.probe import free_port, wait_until_ok

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-1"


def start_server(args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 400) -> ServerProcess:
    """A healthy `longrope serve` on loopback (a 2 GiB CPU KV cache unless ``env`` says otherwise)."""
    server = longrope_serve(args, log, {"VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})}, cwd=REPO,
                            start_timeout=timeout)
    try:
        return server.start()
    except ServerDidNotStart as exc:
        raise AssertionError(str(exc)) from None


def stop_server(server: ServerProcess) -> None:
    server.stop()


def prometheus_config(name: str, target: str, workdir: Path, key: str | None = None) -> Path:
    """deploy/prometheus/NAME with its one job scraping ``target`` every second (its key file in ``workdir``)."""
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / name).read_text())
    (job,) = config["scrape_configs"]
    job["scrape_interval"] = "1s"
    job["static_configs"][0]["targets"] = [target]
    if "authorization" in job:
        assert key is not None, f"{name} sends an API key: give one"
        key_file = workdir / "api-key"
        key_file.write_text(key)
        job["authorization"]["credentials_file"] = str(key_file)
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def prometheus(config: Path, workdir: Path) -> Iterator[str]:
    """Debian's prometheus (installed by scripts/test.sh) on loopback with ``config``; yields its base URL."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed; scripts/test.sh installs Debian's package"
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=(workdir / "log").open("w"), stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_ok(f"{base}/-/ready", proc, timeout=60, interval=0.5), (workdir / "log").read_text()
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def prom_query(base: str, expr: str) -> float:
    """The value of a PromQL expression with one result (0 when it has none)."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    result = json.load(urllib.request.urlopen(url, timeout=10))["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


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
def tiny_server(tiny_model, tmp_path_factory):
    """The tiny Llama (W0 = 256) with its three-step ladder, policy dynamic: promotions happen."""
    model_dir, factors, _ = tiny_model
    log = tmp_path_factory.mktemp("server") / "tiny.log"
    server = start_server(
        ["--model", str(model_dir), "--factors", str(factors), "--served-model-name", "tiny", "--dtype", "float32",
         "--enforce-eager", "--max-model-len", "1024", "--seed", "0", "--shutdown-timeout", "60"],
        log, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    yield server
    stop_server(server)
