"""The plugin registers behind its switch on the vLLM versions it supports, checks each engine when vLLM builds
its input processor, and never stops vLLM for a model it does not serve (rope_ext/vllm_plugin/register.py)."""

import json
import os
import shutil
import subprocess
import sys

import openai
import pytest

from harness.servers import vllm_serve
from rope_ext.environment import plugin_enabled
from rope_ext.models.tiny import TINY_MAX_LEN
from rope_ext.vllm_plugin.vllm_internals import UnsupportedVllm, check_supported
from tests.helpers import REPO

UNSUPPORTED = "0.35.0"


@pytest.mark.unit
def test_supported_versions_and_a_refusal_naming_them():
    for version in ("0.32.0", "0.32.0+cpu", "0.33.0", "0.34.0"):
        check_supported(version)
    with pytest.raises(UnsupportedVllm, match=r"supports vLLM 0\.32\.0, 0\.33\.0, 0\.34\.0, but vLLM 0\.31\.1 is"):
        check_supported("0.31.1")


@pytest.mark.unit
@pytest.mark.parametrize("value,enabled", [(None, True), ("1", True), ("0", False), ("off", False)])
def test_switch(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("LONGROPE_PLUGIN", raising=False)
    else:
        monkeypatch.setenv("LONGROPE_PLUGIN", value)
    assert plugin_enabled() is enabled


@pytest.mark.unit
def test_the_engine_check_and_both_runners_are_hooked():
    import vllm.v1.worker.gpu.model_states as model_states
    from vllm.v1.engine.input_processor import InputProcessor

    from rope_ext.vllm_plugin.register import register

    register()
    register()  # vLLM may call it again in the same process: nothing is wrapped twice
    assert getattr(InputProcessor.__init__, "__longrope__", False)
    assert getattr(model_states.resolve_model_state_cls, "__longrope__", False)
    assert not getattr(model_states.resolve_model_state_cls.__wrapped__, "__longrope__", False)


def _as_version(version: str, root) -> dict[str, str]:
    """Environment under which every Python process (vLLM's engine and workers too) sees vLLM ``version``."""
    root.mkdir(exist_ok=True)
    (root / "sitecustomize.py").write_text(f"import vllm\nvllm.__version__ = {version!r}\n")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture
def plain_model(tiny_model, tmp_path):
    """The tiny model (with its tokenizer) and a plain RoPE config: no ladder anywhere."""
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model[0], plain)
    config = json.loads((plain / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    (plain / "config.json").write_text(json.dumps(config))
    return plain


@pytest.mark.engine
def test_an_unsupported_vllm_refuses_an_engine_with_a_ladder(tiny_engine_model, tmp_path):
    model_dir, factors, _ = tiny_engine_model
    code = (f"from vllm import LLM\nLLM(model={str(model_dir)!r}, dtype='float32', enforce_eager=True, "
            "skip_tokenizer_init=True)")
    env = {**os.environ, **_as_version(UNSUPPORTED, tmp_path / "site"), "LONGROPE_FACTORS": str(factors),
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert f"supports vLLM 0.32.0, 0.33.0, 0.34.0, but vLLM {UNSUPPORTED} is installed" in result.stderr


@pytest.mark.server
def test_an_unsupported_vllm_still_serves_a_model_without_a_ladder(plain_model, tmp_path):
    """Installed beside a vLLM it does not support, the plugin stays out of `vllm serve` for a model it does not
    serve: the server starts, answers, and logs one line saying the plugin stepped aside."""
    env = {**_as_version(UNSUPPORTED, tmp_path / "site"), "LONGROPE_PLUGIN": None, "LONGROPE_FACTORS": None,
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    args = ["--dtype", "float32", "--max-model-len", str(TINY_MAX_LEN), "--enforce-eager", "--served-model-name", "m"]
    with vllm_serve(str(plain_model), args, tmp_path / "serve.log", env=env, cwd=REPO) as server:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        reply = client.completions.create(model="m", prompt="Hello", max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens == 4
        log = server.log_text()
    assert f"vLLM {UNSUPPORTED} is not one it supports, and this engine has no ladder" in log
