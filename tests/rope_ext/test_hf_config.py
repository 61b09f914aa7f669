"""Importing and exporting Hugging Face longrope configs.

The configs below have the shapes of the real Phi cases (keys, rope type spelling, where W0
lives, head and rotary sizes); their factor values are made up here.
"""

import json
import math

import pytest
import torch
from transformers import Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longrope.cli import main
from rope_ext.factors import FactorFileError, load_ladder
from rope_ext.hf_config import ladder_from_hf, ladder_to_hf

pytestmark = pytest.mark.unit


def ramp(n: int, top: float) -> list[float]:
    return [round(1.0 + (top - 1.0) * (i / (n - 1)) ** 2, 4) for i in range(n)]


def phi3_mini_128k() -> dict:
    """transformers v4 layout, legacy rope type name `su`, W0 at the top level; head_dim 96."""
    return {
        "model_type": "phi3",
        "hidden_size": 3072,
        "num_attention_heads": 32,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "su", "short_factor": ramp(48, 1.5), "long_factor": ramp(48, 40.0)},
    }


def phi35_mini() -> dict:
    config = phi3_mini_128k()
    config["rope_scaling"]["type"] = "longrope"
    return config


def phi4_mini() -> dict:
    """Partial rotary: head_dim 128 × 0.75 = 96 rotary dims, 48 factors."""
    return {
        "model_type": "phi3",
        "hidden_size": 3072,
        "num_attention_heads": 24,
        "partial_rotary_factor": 0.75,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "short_factor": ramp(48, 1.2), "long_factor": ramp(48, 60.0)},
    }


def v5_layout() -> dict:
    """transformers v5 layout: everything inside rope_parameters, with per-set mscales."""
    return {
        "model_type": "phi3",
        "hidden_size": 3072,
        "num_attention_heads": 32,
        "max_position_embeddings": 65536,
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 250000.0,
            "original_max_position_embeddings": 8192,
            "short_factor": ramp(48, 1.1),
            "long_factor": ramp(48, 9.0),
            "short_mscale": 1.0,
            "long_mscale": 1.2,
        },
    }


CASES = {"phi3-mini-128k": phi3_mini_128k, "phi3.5-mini": phi35_mini, "phi4-mini": phi4_mini, "v5": v5_layout}


@pytest.mark.parametrize("case", CASES)
def test_import_gives_two_step_ladder(case):
    config = CASES[case]()
    ladder = ladder_from_hf(config)
    short, long = ladder.sets
    assert ladder.model.rotary_dim == 96
    assert short.window == ladder.model.original_window
    assert long.window == config["max_position_embeddings"]
    params = config.get("rope_parameters") or config["rope_scaling"]
    assert short.factors == params["short_factor"] and long.factors == params["long_factor"]


def test_import_keeps_the_shared_attention_factor_on_both_sets():
    ladder = ladder_from_hf(phi3_mini_128k())
    shared = math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))
    assert [fs.attention_scale for fs in ladder.sets] == pytest.approx([shared, shared])


def test_import_honours_per_set_mscales():
    ladder = ladder_from_hf(v5_layout())
    assert [fs.attention_scale for fs in ladder.sets] == [1.0, 1.2]
    assert ladder.model.rope_theta == 250000.0 and ladder.model.original_window == 8192


def transformers_rope(config: dict, seq_len: int):
    config = json.loads(json.dumps(config))
    if config.get("rope_scaling", {}).get("type") == "su":
        config["rope_scaling"]["type"] = "longrope"  # v5 no longer reads the legacy name; vLLM renames it too
    hf = Phi3Config(**{k: v for k, v in config.items() if k != "model_type"})
    return ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu", seq_len)


@pytest.mark.parametrize("case", ["phi3-mini-128k", "phi3.5-mini", "phi4-mini"])
def test_round_trip_hf_file_hf(case, tmp_path):
    original = CASES[case]()
    (tmp_path / "config.json").write_text(json.dumps(original))
    assert main(["factors", "from-hf", str(tmp_path / "config.json"), "-o", str(tmp_path / "ladder.json")]) == 0
    assert main(["factors", "to-hf", str(tmp_path / "ladder.json"), "-o", str(tmp_path / "back.json")]) == 0
    back = json.loads((tmp_path / "back.json").read_text())
    rebuilt = {**original, **back}
    rebuilt.pop("rope_scaling")
    if "partial_rotary_factor" in original:
        rebuilt["rope_parameters"]["partial_rotary_factor"] = original["partial_rotary_factor"]
    # transformers computes the same frequencies and attention factor from both configs
    for seq_len in (4096, 8192):
        inv_a, att_a = transformers_rope(original, seq_len)
        inv_b, att_b = transformers_rope(rebuilt, seq_len)
        torch.testing.assert_close(inv_a, inv_b, rtol=0, atol=0)
        assert att_a == pytest.approx(att_b)
    # and the file read back is the same ladder
    assert ladder_from_hf(rebuilt) == load_ladder(tmp_path / "ladder.json")


def test_export_keeps_distinct_mscales():
    params = ladder_to_hf(ladder_from_hf(v5_layout()))["rope_parameters"]
    assert params["short_mscale"] == 1.0 and params["long_mscale"] == 1.2
    assert "attention_factor" not in params


def test_import_refuses_other_rope_types():
    config = phi3_mini_128k()
    config["rope_scaling"]["type"] = "yarn"
    with pytest.raises(FactorFileError, match="rope_scaling.type"):
        ladder_from_hf(config)


def test_import_refuses_wrong_factor_count_naming_the_field():
    config = phi3_mini_128k()
    config["rope_scaling"]["long_factor"].pop()
    with pytest.raises(FactorFileError, match=r"sets\.1\.factors: expected 48 factors"):
        ladder_from_hf(config)


def test_export_refuses_three_sets(tmp_path):
    from rope_ext.factors import parse_ladder
    from tests.helpers import GOOD

    with pytest.raises(ValueError, match="exactly two sets"):
        ladder_to_hf(parse_ladder(GOOD))
