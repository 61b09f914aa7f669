"""Engines the plugin cannot drive are refused at start, each refusal naming what to change
(rope_ext/vllm_plugin/engine_checks.py)."""

import json

import pytest


def _engine_config(hf_config: dict, uses_mrope=False, is_multimodal_model=False, use_mla=False,
                   speculative: str | None = None, prefill_context_parallel_size: int = 1):
    """The parts of a VllmConfig that engine_checks reads."""
    from types import SimpleNamespace

    model = SimpleNamespace(hf_config=hf_config, model="m", uses_mrope=uses_mrope, use_mla=use_mla,
                            is_multimodal_model=is_multimodal_model)
    return SimpleNamespace(model_config=model, additional_config={},
                           parallel_config=SimpleNamespace(prefill_context_parallel_size=prefill_context_parallel_size),
                           speculative_config=SimpleNamespace(method=speculative) if speculative else None)


@pytest.mark.unit
@pytest.mark.parametrize("setting,message", [
    ({"uses_mrope": True}, "multimodal or uses M-RoPE"),
    ({"is_multimodal_model": True}, "multimodal or uses M-RoPE"),
    ({"prefill_context_parallel_size": 2}, r"prefill context parallelism \(--prefill-context-parallel-size 2\)"),
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
