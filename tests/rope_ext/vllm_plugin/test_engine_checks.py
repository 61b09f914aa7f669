"""Engines the plugin cannot drive are refused at start, each refusal naming what to change
(rope_ext/vllm_plugin/engine_checks.py)."""

import json

import pytest

from rope_ext.models.tiny import TINY_MAX_LEN
from rope_ext.selftest.engine_run import EngineRunFailed, run_in_process


def _engine_config(hf_config: dict, uses_mrope=False, is_multimodal_model=False, use_mla=False,
                   use_v2_model_runner=False, speculative: str | None = None):
    """The parts of a VllmConfig that engine_checks reads."""
    from types import SimpleNamespace

    model = SimpleNamespace(hf_config=hf_config, model="m", uses_mrope=uses_mrope, use_mla=use_mla,
                            is_multimodal_model=is_multimodal_model)
    return SimpleNamespace(model_config=model, use_v2_model_runner=use_v2_model_runner,
                           speculative_config=SimpleNamespace(method=speculative) if speculative else None)


@pytest.mark.unit
@pytest.mark.parametrize("setting,message", [
    ({"uses_mrope": True}, "multimodal or uses M-RoPE"),
    ({"is_multimodal_model": True}, "multimodal or uses M-RoPE"),
    ({"use_v2_model_runner": True}, "V2 model runner is selected"),
    ({"use_mla": True}, "multi-head latent attention"),
    ({"speculative": "eagle3"},
     r"draft model \(method 'eagle3'\).*Use a model-free method \(ngram, ngram_gpu, suffix\)"),
    ({"speculative": "mtp"}, r"draft model \(method 'mtp'\)"),
    ({"speculative": "draft_model"}, r"draft model \(method 'draft_model'\)"),
])
def test_engines_the_plugin_cannot_drive_are_refused(tiny_model, monkeypatch, setting, message):
    from rope_ext.vllm_plugin.engine_checks import UnsupportedEngine, check_engine

    monkeypatch.delenv("LONGROPE_FACTORS", raising=False)
    config = json.loads((tiny_model[0] / "config.json").read_text())  # a longrope config: a ladder
    with pytest.raises(UnsupportedEngine, match=message):
        check_engine(_engine_config(config, **setting))
    check_engine(_engine_config(config))
    no_ladder = {k: v for k, v in config.items() if k != "rope_parameters"}
    check_engine(_engine_config(no_ladder, **setting))  # without a ladder the plugin stays out of the way


@pytest.mark.unit
@pytest.mark.parametrize("method", ["ngram", "ngram_gpu", "suffix"])
def test_model_free_speculation_is_allowed(tiny_model, monkeypatch, method):
    from rope_ext.vllm_plugin.engine_checks import check_engine

    monkeypatch.delenv("LONGROPE_FACTORS", raising=False)
    check_engine(_engine_config(json.loads((tiny_model[0] / "config.json").read_text()), speculative=method))


@pytest.mark.engine
def test_v2_model_runner_stops_the_engine(tiny_model, tmp_path):
    """An explicit VLLM_USE_V2_MODEL_RUNNER=1 beats the plugin's default. On this CPU vLLM itself
    refuses V2 (no Triton CPU backend); on CUDA the plugin's check below stops it."""
    model_dir, factors, _ = tiny_model
    engine = {"dtype": "float32", "max_model_len": TINY_MAX_LEN, "enforce_eager": True}
    spec = {"model": str(model_dir), "engine": engine, "requests": []}
    with pytest.raises(EngineRunFailed) as info:
        run_in_process(spec, {"LONGROPE_FACTORS": str(factors), "VLLM_USE_V2_MODEL_RUNNER": "1"}, tmp_path, "v2")
    assert ("V2 model runner is selected (VLLM_USE_V2_MODEL_RUNNER=1" in str(info.value)
            or "Model Runner V2 requires Triton" in str(info.value))
