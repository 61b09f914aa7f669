"""The engine's ladder: a factor file, else the model's own longrope config, refused when it does not fit
the model (rope_ext/vllm_plugin/model_ladder.py)."""

import json

import pytest

from rope_ext.factors import load_ladder, parse_ladder, save_ladder
from rope_ext.models.tiny import TINY_MAX_LEN
from rope_ext.selftest.engine_run import EngineRunFailed, run_in_process
from rope_ext.vllm_plugin.model_ladder import LadderMismatch, check_fits, ladder_for_model


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

    with pytest.raises(LadderMismatch, match=f"model.{field} is {value}"):
        check_fits(parse_ladder(data), config)


@pytest.mark.engine
def test_engine_start_refuses_a_file_for_another_model(tiny_model, tmp_path):
    model_dir, factors, _ = tiny_model
    ladder = load_ladder(factors)
    wrong = ladder.model_copy(update={"model": ladder.model.model_copy(update={"rope_theta": 500000.0})})
    path = tmp_path / "wrong.json"
    save_ladder(wrong, path)
    engine = {"dtype": "float32", "max_model_len": TINY_MAX_LEN, "enforce_eager": True}
    spec = {"model": str(model_dir), "engine": engine, "requests": []}
    with pytest.raises(EngineRunFailed) as info:
        run_in_process(spec, {"LONGROPE_FACTORS": str(path)}, tmp_path, "wrong")
    assert "model.rope_theta is 500000.0, but the served model has rope_theta 10000.0" in str(info.value)
