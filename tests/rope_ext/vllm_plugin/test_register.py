"""The plugin refuses, at engine start, what it was not built for, saying which."""

import json
import subprocess
import sys

import pytest
import torch

from rope_ext.environment import plugin_enabled
from rope_ext.factors import load_ladder, save_ladder
from rope_ext.selection import engine_set
from rope_ext.selftest.engine_run import EngineRunFailed, run_in_process
from rope_ext.vllm_plugin.model_ladder import LadderMismatch, check_fits, ladder_for_model
from rope_ext.vllm_plugin.register import UnsupportedVllm, check_vllm_version
from rope_ext.vllm_plugin.request_sets import salt_for
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


@pytest.mark.unit
def test_salt_separates_sets_and_keeps_the_clients():
    """Every (set, client salt) pair has its own prefix-cache salt, the same on every call, which keeps the
    client's salt whole (so tenants stay apart inside one set as they do in stock vLLM)."""
    pairs = [(name, client) for name in ("short", "mid", "long") for client in (None, "tenant-a", "tenant-b")]
    salts = [salt_for(name, client) for name, client in pairs]
    assert len(set(salts)) == len(pairs)
    assert salts == [salt_for(name, client) for name, client in pairs]
    assert all(client in salt for (_, client), salt in zip(pairs, salts) if client)
    assert salt_for("short", "") == salt_for("short", None)  # an empty salt is vLLM's "no salt"


@pytest.mark.unit
def test_engine_rule_is_pinned_else_budget(tiny_model):
    ladder = tiny_model[2]
    assert engine_set(ladder, 100, 10) == 0
    assert engine_set(ladder, 100, 200) == 1
    assert engine_set(ladder, 100, 10, "long") == 2


@pytest.mark.unit
def test_ladder_comes_from_file_else_config(tiny_model, monkeypatch):
    model_dir, factors, ladder = tiny_model
    config = json.loads((model_dir / "config.json").read_text())
    monkeypatch.delenv("LONGROPE_FACTORS", raising=False)
    assert ladder_for_model(config).names == ["short", "long"]  # the config's Phi-3 style pair
    monkeypatch.setenv("LONGROPE_FACTORS", str(factors))
    assert ladder_for_model(config) == ladder


@pytest.mark.unit
@pytest.mark.parametrize("field,value", [("original_window", 512), ("rotary_dim", 32), ("rope_theta", 500000.0)])
def test_mismatched_file_is_refused_naming_the_field(tiny_model, field, value):
    model_dir, factors, _ = tiny_model
    data = json.loads(factors.read_text())
    data["model"][field] = value
    if field == "rotary_dim":
        for fs in data["sets"]:
            fs["factors"] = fs["factors"][: value // 2]
    if field == "original_window":
        data["sets"] = data["sets"][1:]  # windows must stay >= W0
    config = json.loads((model_dir / "config.json").read_text())
    from rope_ext.factors import parse_ladder

    with pytest.raises(LadderMismatch, match=f"model.{field} is {value}"):
        check_fits(parse_ladder(data), config)


@pytest.mark.engine
def test_engine_start_refuses_a_file_for_another_model(tiny_model, tmp_path):
    model_dir, factors, _ = tiny_model
    ladder = load_ladder(factors)
    wrong = ladder.model_copy(update={"model": ladder.model.model_copy(update={"rope_theta": 500000.0})})
    path = tmp_path / "wrong.json"
    save_ladder(wrong, path)
    spec = {"model": str(model_dir), "engine": {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True},
            "requests": []}
    with pytest.raises(EngineRunFailed) as info:
        run_in_process(spec, {"LONGROPE_FACTORS": str(path)}, tmp_path, "wrong")
    assert "model.rope_theta is 500000.0, but the served model has rope_theta 10000.0" in str(info.value)


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
def test_every_vllm_internal_the_plugin_uses_is_listed_and_present():
    """One list of vLLM's private names (vllm_internals.py): this vLLM has them all, and every
    runner method a mixin extends and every EngineClient method our engine client overrides is on it."""
    from vllm.engine.protocol import EngineClient
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from rope_ext.vllm_plugin.cpu_generators import SeededCpuGeneratorsMixin
    from rope_ext.vllm_plugin.runner import PerRequestSetsMixin
    from rope_ext.vllm_plugin.vllm_internals import CLI_INTERNALS, INTERNALS, check_internals
    from server.engine_client import LadderEngineClient
    from server.vllm_internals import SERVER_INTERNALS

    check_internals()
    check_internals(CLI_INTERNALS)
    check_internals(SERVER_INTERNALS)
    overridden = {name for name in vars(LadderEngineClient) if hasattr(EngineClient, name)
                  and not name.startswith("__") and callable(vars(LadderEngineClient)[name])}
    assert overridden and overridden <= {i.name.removeprefix("EngineClient.") for i in SERVER_INTERNALS}, overridden
    listed = {i.name.removeprefix("GPUModelRunner.") for i in INTERNALS if i.name.startswith("GPUModelRunner.")}
    for mixin in (PerRequestSetsMixin, SeededCpuGeneratorsMixin):
        extended = {name for name in vars(mixin) if callable(vars(mixin)[name]) and hasattr(GPUModelRunner, name)}
        assert extended and extended <= listed, extended - listed


@pytest.mark.unit
def test_a_missing_vllm_internal_is_named():
    from rope_ext.vllm_plugin.vllm_internals import Internal, MissingInternal, check_internals, check_runner_state

    moved = Internal("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs_v2", "extends it")
    with pytest.raises(MissingInternal,
                       match=r"no vllm\.v1\.worker\.gpu_model_runner\.GPUModelRunner\._prepare_inputs_v2"):
        check_internals((moved,))
    with pytest.raises(MissingInternal, match="has no input_batch.req_ids"):
        check_runner_state(object(), ("input_batch.req_ids",))


@pytest.mark.engine
def test_v2_model_runner_stops_the_engine(tiny_model, tmp_path):
    """An explicit VLLM_USE_V2_MODEL_RUNNER=1 beats the plugin's default. On this CPU vLLM itself
    refuses V2 (no Triton CPU backend); on CUDA the plugin's check below stops it."""
    model_dir, factors, _ = tiny_model
    spec = {"model": str(model_dir), "engine": {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True},
            "requests": []}
    with pytest.raises(EngineRunFailed) as info:
        run_in_process(spec, {"LONGROPE_FACTORS": str(factors), "VLLM_USE_V2_MODEL_RUNNER": "1"}, tmp_path, "v2")
    assert ("V2 model runner is selected (VLLM_USE_V2_MODEL_RUNNER=1" in str(info.value)
            or "Model Runner V2 requires Triton" in str(info.value))


@pytest.mark.unit
def test_the_engine_check_runs_when_vllm_builds_its_input_processor(monkeypatch):
    from vllm.v1.engine.input_processor import InputProcessor

    from rope_ext.vllm_plugin.register import register

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")  # register() sets it when unset; restored after
    register()
    assert getattr(InputProcessor.__init__, "__longrope__", False)


@pytest.mark.unit
@pytest.mark.parametrize("mrope,multimodal,v2,message", [
    (True, False, False, "multimodal or uses M-RoPE"),
    (False, True, False, "multimodal or uses M-RoPE"),
    (False, False, True, "V2 model runner is selected"),
])
def test_engines_the_plugin_cannot_drive_are_refused(tiny_model, monkeypatch, mrope, multimodal, v2, message):
    from types import SimpleNamespace

    from rope_ext.vllm_plugin.engine_checks import UnsupportedEngine, check_engine

    monkeypatch.delenv("LONGROPE_FACTORS", raising=False)
    config = json.loads((tiny_model[0] / "config.json").read_text())  # a longrope config: a ladder

    def engine(hf_config, mrope, multimodal, v2):
        model = SimpleNamespace(hf_config=hf_config, model="m", uses_mrope=mrope, is_multimodal_model=multimodal)
        return SimpleNamespace(model_config=model, use_v2_model_runner=v2)

    with pytest.raises(UnsupportedEngine, match=message):
        check_engine(engine(config, mrope, multimodal, v2))
    check_engine(engine(config, False, False, False))
    no_ladder = {k: v for k, v in config.items() if k != "rope_parameters"}
    check_engine(engine(no_ladder, mrope, multimodal, v2))  # without a ladder the plugin stays out of the way


def _rotary_layer(base: float):
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    layer = torch.nn.Module()
    layer.rotary_emb = RotaryEmbedding(64, 64, 1024, base, True, torch.float32)
    return layer


@pytest.fixture
def vllm_context():
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        yield


@pytest.mark.unit
def test_rotary_modules_that_differ_are_refused(tiny_model, vllm_context):
    """Local and global RoPE bases in one model: one ladder cannot replace both."""
    from rope_ext.vllm_plugin.runner import swap_rotary

    ladder = tiny_model[2]
    alike = torch.nn.Sequential(_rotary_layer(10000.0), _rotary_layer(10000.0))
    assert swap_rotary(alike, ladder, 1024, torch.float32) == 2
    differ = torch.nn.Sequential(_rotary_layer(10000.0), _rotary_layer(1e6))
    with pytest.raises(LadderMismatch, match=r"rotary modules differ \(0\.rotary_emb: .*base=10000\.0.*; "
                                             r"1\.rotary_emb: .*base=1000000\.0"):
        swap_rotary(differ, ladder, 1024, torch.float32)


@pytest.mark.unit
def test_only_the_language_models_rotary_modules_are_swapped(tiny_model, vllm_context):
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    from rope_ext.vllm_plugin.rotary import LadderRotaryEmbedding
    from rope_ext.vllm_plugin.runner import swap_rotary

    class Multimodal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = _rotary_layer(1e6)  # another base: would be refused if it were swapped
            self.language = torch.nn.Sequential(_rotary_layer(10000.0), _rotary_layer(10000.0))

        def get_language_model(self):
            return self.language

    model = Multimodal()
    assert swap_rotary(model, tiny_model[2], 1024, torch.float32) == 2
    assert all(isinstance(layer.rotary_emb, LadderRotaryEmbedding) for layer in model.language)
    assert type(model.vision.rotary_emb) is RotaryEmbedding
