"""Start-up: `longrope serve` with no flags serves the default model right; what fails at start-up makes it
exit non-zero, with the reason on stderr, instead of leaving a process that answers 503 forever."""

import json
import os
import subprocess
import sys

import openai
import pytest

from harness.servers import PORT, ServerProcess
from rope_ext.models.smollm2 import default_model_dir
from rope_ext.models.tiny import TINY_MAX_LEN
from tests.helpers import REPO

pytestmark = pytest.mark.server


def serve(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longrope", "serve", "--port", "0", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})


def test_no_flags_serves_the_default_model_in_float32(tmp_path):
    """`longrope serve` as the README and the image run it (only the port from the environment): CPU
    float32 by default, compiled, the shipped ladder; "Paris" at temperature 0."""
    server = ServerProcess([sys.executable, "-m", "longrope", "serve"], tmp_path / "plain.log",
                           {"LONGROPE_PORT": PORT, "LONGROPE_FACTORS": None, "VLLM_CPU_KVCACHE_SPACE": "2"}, cwd=REPO)
    with server:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        models = client.models.list().data
        assert [m.id for m in models] == [default_model_dir().name]
        reply = client.chat.completions.create(model=models[0].id, temperature=0, max_tokens=12, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in reply.choices[0].message.content
        assert "dtype=torch.float32" in server.log_text()


def test_a_mistyped_flag_exits_2_before_anything_starts(tiny_model):
    model_dir, factors, _ = tiny_model
    result = serve(["--model", str(model_dir), "--factors", str(factors), "--max-model-length", str(TINY_MAX_LEN)], 60)
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
                    "--max-model-len", str(TINY_MAX_LEN), "--num-gpu-blocks-override", "2"], 60)
    assert result.returncode == 1
    assert "larger than the available KV cache memory" in result.stderr
    assert "error: the engine failed to start: Engine core initialization failed" in result.stderr
