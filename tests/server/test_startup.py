"""What fails at start-up makes `longrope serve` exit non-zero, with the reason on stderr, instead of
leaving a process that answers 503 forever (a container would never restart)."""

import json
import os
import subprocess
import sys

from tests.server.conftest import REPO


def serve(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rope_ext.cli", "serve", "--port", "0", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})


def test_a_mistyped_flag_exits_2_before_anything_starts(tiny_model):
    model_dir, factors, _ = tiny_model
    result = serve(["--model", str(model_dir), "--factors", str(factors), "--max-model-length", "1024"], 60)
    assert result.returncode == 2
    assert "unrecognized arguments: --max-model-length" in result.stderr


def test_a_broken_factor_file_exits_2_naming_the_field(tiny_model, tmp_path):
    model_dir, factors, _ = tiny_model
    data = json.loads(factors.read_text())
    data["sets"][1]["window"] = -5
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    result = serve(["--model", str(model_dir), "--factors", str(broken)], 60)
    assert result.returncode == 2
    assert "sets.1.window" in result.stderr


def test_an_engine_that_cannot_start_exits_1(tiny_model):
    """Two KV-cache blocks cannot hold one 1024-token request: vLLM's engine core dies at start."""
    model_dir, factors, _ = tiny_model
    result = serve(["--model", str(model_dir), "--factors", str(factors), "--enforce-eager",
                    "--max-model-len", "1024", "--num-gpu-blocks-override", "2"], 300)
    assert result.returncode == 1
    assert "larger than the available KV cache memory" in result.stderr
    assert "error: the engine failed to start: Engine core initialization failed" in result.stderr
