"""Deployment files: what can be proven without a Docker engine or a cluster."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from longrope.cli import build_parser
from rope_ext.models.smollm2 import DEFAULT_LADDER
from server.serve import build_parser as serve_parser
from tests.helpers import REPO

pytestmark = pytest.mark.unit

KUBE = REPO / "deploy" / "kubernetes"
BIN = Path(sys.executable).parent


def dockerfile_lines() -> list[str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_hadolint_is_clean():
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", str(REPO / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_copied_path_exists_and_is_not_ignored():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copies = [line.split()[1:-1] for line in dockerfile_lines() if line.startswith("COPY")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (REPO / source).exists(), source
            assert source.strip("./") not in ignored, source


def test_entrypoint_is_our_serve_command():
    entrypoints = [json.loads(line.removeprefix("ENTRYPOINT")) for line in dockerfile_lines()
                   if line.startswith("ENTRYPOINT")]
    assert entrypoints and all(e == ["longrope", "serve"] for e in entrypoints)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["longrope"] == "longrope.cli:main"
    assert "serve" in build_parser()._subparsers._group_actions[0].choices
    help_text = subprocess.run([str(BIN / "longrope"), "serve", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--rope-policy" in help_text.stdout


def test_images_run_as_non_root_expose_8000_and_check_health():
    lines = dockerfile_lines()
    stages = [line.split()[-1] for line in lines if line.startswith("FROM")]
    assert stages == ["cpu", "gpu"]  # the last stage, GPU, is what a plain `docker build` makes
    for keyword, expected in (("USER", "10001"), ("EXPOSE", "8000")):
        assert [line.split()[1] for line in lines if line.startswith(keyword)] == [expected, expected]
    assert sum("/health" in line for line in lines if line.startswith("HEALTHCHECK")) == 2


def test_the_health_check_command_passes_only_on_200(tmp_path):
    """The images' HEALTHCHECK runs `longrope healthcheck URL`: 0 on a 200, 1 on another status or no server."""
    import http.server
    import threading

    from harness.servers import free_port

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        def check(url: str) -> int:
            return subprocess.run([str(BIN / "longrope"), "healthcheck", url], capture_output=True).returncode

        assert check(f"{base}/health") == 0
        assert check(f"{base}/draining") == 1
        assert check(f"http://127.0.0.1:{free_port()}/health") == 1
    finally:
        server.shutdown()


def manifests() -> list[Path]:
    return sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml")


def _containers(path: Path) -> list[dict]:
    spec = yaml.safe_load(path.read_text()).get("spec", {})
    return spec.get("template", {}).get("spec", {}).get("containers", [])


def test_manifests_validate_against_kubernetes_schemas():
    core = [str(p) for p in manifests() if yaml.safe_load(p.read_text())["kind"] != "ServiceMonitor"]
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", *core],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_service_monitor_scrapes_the_service_port():
    monitor = yaml.safe_load((KUBE / "base" / "servicemonitor.yaml").read_text())
    service = yaml.safe_load((KUBE / "base" / "service.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.parametrize("variant", ["base", "single-gpu", "multi-gpu", "multi-node-ray", "selftest"])
def test_kustomizations_name_files_that_exist(variant):
    kustomization = yaml.safe_load((KUBE / variant / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (KUBE / variant / resource).exists(), resource
    for generator in kustomization.get("configMapGenerator", []):
        for name in generator["files"]:
            assert (KUBE / variant / name).exists(), name


def test_shipped_factor_configmap_is_the_default_ladder():
    assert json.loads((KUBE / "base" / "factors.json").read_text()) == json.loads(DEFAULT_LADDER.read_text())


@pytest.mark.parametrize("variant", ["single-gpu", "multi-gpu"])
def test_deployments_probe_health_and_outlast_the_drain(variant):
    deployment = yaml.safe_load((KUBE / variant / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    drain = float(next(e["value"] for e in container["env"] if e["name"] == "LONGROPE_SHUTDOWN_TIMEOUT"))
    assert pod["terminationGracePeriodSeconds"] > drain
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    hpa = yaml.safe_load((KUBE / variant / "hpa.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"


def serve_args_of(path: Path) -> list[str]:
    """The `longrope serve` arguments a manifest's server container runs with."""
    container = yaml.safe_load(path.read_text())["spec"]["template"]["spec"]["containers"][0]
    if container.get("command"):
        return shlex.split(container["args"][0].split("exec longrope serve", 1)[1])
    return container["args"]


def engine_args_of(argv: list[str]):
    """vLLM's engine arguments as `longrope serve` (vLLM's own parser, plus ours) builds them."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(serve_parser().parse_args(argv))


@pytest.mark.parametrize("manifest,expected", [
    ("multi-gpu/deployment.yaml", {"tensor_parallel_size": 4}),
    ("multi-node-ray/ray-head.yaml", {"tensor_parallel_size": 8, "pipeline_parallel_size": 2,
                                      "distributed_executor_backend": "ray"}),
])
def test_parallel_arguments_reach_the_engine_configuration(manifest, expected):
    engine_args = engine_args_of(serve_args_of(KUBE / manifest))
    for field, value in expected.items():
        assert getattr(engine_args, field) == value


def test_data_parallel_and_ray_pass_through():
    argv = ["--data-parallel-size", "2", "--pipeline-parallel-size", "2", "--distributed-executor-backend", "ray"]
    engine_args = engine_args_of(["--port", "9000", *argv])
    assert (engine_args.data_parallel_size, engine_args.pipeline_parallel_size) == (2, 2)
    assert engine_args.distributed_executor_backend == "ray"


def test_manifest_environment_variables_are_flags(monkeypatch):
    """The manifests and the image configure the server with LONGROPE_<DEST> variables."""
    for name, value in {"LONGROPE_HOST": "0.0.0.0", "LONGROPE_PORT": "9001", "LONGROPE_API_KEY": "a, b",
                        "LONGROPE_SERVED_MODEL_NAME": "smol", "LONGROPE_SHUTDOWN_TIMEOUT": "45",
                        "LONGROPE_ENFORCE_EAGER": "true", "LONGROPE_ROPE_POLICY": "budget"}.items():
        monkeypatch.setenv(name, value)
    args = serve_parser().parse_args([])
    assert (args.host, args.port, args.api_key, args.served_model_name) == ("0.0.0.0", 9001, ["a", "b"], ["smol"])
    assert (args.shutdown_timeout, args.enforce_eager, args.rope_policy) == (45, True, "budget")
    assert serve_parser().parse_args(["--port", "9002"]).port == 9002  # a flag still wins
    monkeypatch.setenv("LONGROPE_ROPE_POLICY", "sometimes")  # refused like the flag would be
    with pytest.raises(SystemExit):
        serve_parser()
    monkeypatch.delenv("LONGROPE_ROPE_POLICY")
    variables = {e["name"] for path in manifests() for c in _containers(path) for e in c.get("env", [])}
    dests = {action.dest.upper() for action in serve_parser()._actions}
    assert {v.removeprefix("LONGROPE_") for v in variables if v.startswith("LONGROPE_")} <= dests


def test_compose_mounts_exist_and_prometheus_targets_the_server():
    compose_dir = REPO / "deploy" / "compose"
    compose = yaml.safe_load((compose_dir / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            assert (compose_dir / volume.split(":")[0]).resolve().exists(), volume
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    target = scrape["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == "longrope-serve:8000" and "longrope-serve" in compose["services"]
    assert compose["services"]["longrope-serve"]["build"]["target"] == "cpu"
    assert re.fullmatch(r"\d+s", compose["services"]["longrope-serve"]["stop_grace_period"])
    assert os.path.basename(compose["services"]["longrope-serve"]["build"]["context"]) == ".."


def test_every_server_gets_a_sized_dev_shm():
    """vLLM's engine processes talk through /dev/shm: Docker's 64 MB default kills the engine at start."""
    compose = yaml.safe_load((REPO / "deploy" / "compose" / "docker-compose.yml").read_text())
    assert compose["services"]["longrope-serve"]["shm_size"] == "1gb"
    servers = [p for p in manifests() if yaml.safe_load(p.read_text())["kind"] in ("Deployment", "StatefulSet", "Job")]
    assert len(servers) == 5
    for path in servers:
        pod = yaml.safe_load(path.read_text())["spec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        shm = next(name for name, mount in mounts.items() if mount == "/dev/shm")
        assert volumes[shm]["emptyDir"]["medium"] == "Memory", path
        assert volumes[shm]["emptyDir"]["sizeLimit"].endswith("Gi"), path


def test_cpu_serves_float32_unless_a_dtype_is_given():
    """vLLM's CPU default (bfloat16 with torch.compile) flips SmolLM2's "Paris": the image and
    `longrope serve` with no flags must run float32; an explicit --dtype still wins."""
    assert engine_args_of([]).dtype == "float32"
    assert engine_args_of(["--dtype", "bfloat16"]).dtype == "bfloat16"


def test_selftest_job_runs_the_selftest_on_the_served_model_and_ladder():
    job = yaml.safe_load((KUBE / "selftest" / "job.yaml").read_text())
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["longrope", "selftest", "--compare-modes", "--model", "/models/model"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/models/model" in mounts
    factors = next(e["value"] for e in container["env"] if e["name"] == "LONGROPE_FACTORS")
    assert factors.rsplit("/", 1)[0] in mounts
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert job["spec"]["backoffLimit"] == 0  # a failing row is a result, not a reason to retry
