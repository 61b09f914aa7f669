"""The plugin registers only on the vLLM it was built for, behind its switch, and checks each engine
when vLLM builds its input processor (rope_ext/vllm_plugin/register.py)."""

import subprocess
import sys

import pytest

from rope_ext.environment import plugin_enabled
from rope_ext.vllm_plugin.register import UnsupportedVllm, check_vllm_version
from tests.helpers import REPO


@pytest.mark.unit
def test_version_check_names_both_versions():
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.0+cpu")
    with pytest.raises(UnsupportedVllm, match=r"built for vLLM 0\.32\.0, but vLLM 0\.31\.1 is installed"):
        check_vllm_version("0.31.1")


@pytest.mark.unit
@pytest.mark.parametrize("value,enabled", [(None, True), ("1", True), ("0", False), ("off", False)])
def test_switch(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("LONGROPE_PLUGIN", raising=False)
    else:
        monkeypatch.setenv("LONGROPE_PLUGIN", value)
    assert plugin_enabled() is enabled


@pytest.mark.engine
def test_engine_start_refuses_another_vllm_version(tiny_model):
    code = (
        "import vllm; vllm.__version__ = '0.31.1'\n"
        "from vllm import LLM\n"
        f"LLM(model={str(tiny_model[0])!r}, dtype='float32', enforce_eager=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "built for vLLM 0.32.0, but vLLM 0.31.1 is installed" in result.stderr


@pytest.mark.unit
def test_the_engine_check_runs_when_vllm_builds_its_input_processor(monkeypatch):
    from vllm.v1.engine.input_processor import InputProcessor

    from rope_ext.vllm_plugin.register import register

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")  # register() sets it when unset; restored after
    register()
    assert getattr(InputProcessor.__init__, "__longrope__", False)
