"""Helpers the tests share: the repository's root, a small valid ladder, an engine run under the expected model
runner and its results against their reference, `longrope serve` on loopback, its /metrics read back, a real
Prometheus."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness.servers import ServerDidNotStart, ServerProcess, free_port, longrope_serve, wait_until_ok
from rope_ext.selftest.engine_run import run_in_process
from rope_ext.selftest.reference import assert_greedy_matches
from rope_ext.selftest.run import expected_set

REPO = Path(__file__).resolve().parents[1]

# A valid three-set ladder file (windows 256, 512, 1024) that the factor-file tests break field by field.
GOOD = {
    "format_version": 1,
    "model": {"name": "tiny", "rope_theta": 10000.0, "rotary_dim": 8, "original_window": 256},
    "sets": [
        {"name": "short", "window": 256, "factors": [1.0, 1.0, 1.0, 1.0]},
        {"name": "mid", "window": 512, "factors": [1.0, 1.2, 1.5, 2.0], "n_hat": 4},
        {"name": "long", "window": 1024, "factors": [1.0, 1.5, 3.0, 4.0], "attention_scale": 1.2},
    ],
}


def expected_for(ladder, reference, req):
    name = expected_set(ladder, req)
    return name, reference.run(req["prompt_token_ids"], req["max_tokens"], name)


def assert_matches(got, ref, where, prompt_logprobs=True):
    """An engine_run result against its reference (see reference.assert_greedy_matches)."""
    assert_greedy_matches(ref, got["tokens"], got["token_logprobs"], where,
                          got["prompt_logprobs"] if prompt_logprobs else None)


def run_engine(spec: dict, env: dict[str, str], workdir: Path, name: str, runner: str) -> dict:
    """``run_in_process``, and the engine must have run under vLLM's ``runner`` model runner (the tests'
    ``--vllm-runner``): a silent fall-back to the other runner would prove nothing about this one."""
    out = run_in_process(spec, env, workdir, name)
    assert out["runner"] == runner, f"engine run {name} ran under vLLM's {out['runner']} model runner, not {runner}"
    return out


def assert_runner(server: ServerProcess, runner: str) -> None:
    """The server's engine shifts positions in vLLM's ``runner`` model runner (the plugin logs which, once)."""
    log = server.log_text()
    assert f"vLLM's {runner} model runner shifts the positions" in log, f"not under {runner}:\n{log[-3000:]}"


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


def scrape(server) -> str:
    return urllib.request.urlopen(f"{server.base}/metrics", timeout=10).read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(table: dict, name: str, **labels: str) -> float:
    return table.get((name, frozenset(labels.items())), 0.0)
