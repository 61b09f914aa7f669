"""Factor files: the schema accepts a good ladder and refuses each broken field by name."""

import copy
import json
import math

import pytest

from longrope.cli import main
from rope_ext.factors import FactorFileError, default_attention_scale, json_schema, load_ladder, parse_ladder
from tests.helpers import GOOD, REPO

pytestmark = pytest.mark.unit

def broken(edit):
    data = copy.deepcopy(GOOD)
    edit(data)
    return data


def test_good_ladder_loads_and_fills_default_attention_scale():
    ladder = parse_ladder(GOOD)
    assert ladder.names == ["short", "mid", "long"]
    assert ladder.sets[0].attention_scale == 1.0
    assert ladder.sets[1].attention_scale == pytest.approx(math.sqrt(1 + math.log(2) / math.log(256)))
    assert ladder.sets[2].attention_scale == 1.2
    assert ladder.max_window == 1024


def test_default_attention_scale_is_one_at_or_below_w0():
    assert default_attention_scale(8192, 8192) == 1.0
    assert default_attention_scale(16384, 8192) == pytest.approx(1.0377, abs=1e-4)  # docs/design.md quotes it as 1.037


REFUSALS = {
    "wrong factor count": (lambda d: d["sets"][1]["factors"].pop(), "sets.1.factors", "expected 4 factors"),
    "factor below 1": (lambda d: d["sets"][2]["factors"].__setitem__(1, 0.9), "sets.2.factors.1",
                       "greater than or equal to 1"),
    "NaN factor": (lambda d: d["sets"][1]["factors"].__setitem__(0, float("nan")), "sets.1.factors.0", "finite"),
    "inf factor": (lambda d: d["sets"][1]["factors"].__setitem__(3, float("inf")), "sets.1.factors.3", "finite"),
    "windows not increasing": (lambda d: d["sets"][2].__setitem__("window", 512), "sets.2.window", "strictly increase"),
    "window below W0": (lambda d: d["sets"][0].__setitem__("window", 128), "sets.0.window",
                        "below the original window"),
    "duplicate names": (lambda d: d["sets"][2].__setitem__("name", "short"), "sets.2.name", "duplicate"),
    "negative n_hat": (lambda d: d["sets"][1].__setitem__("n_hat", -1), "sets.1.n_hat", "greater than or equal to 0"),
    "empty ladder": (lambda d: d.__setitem__("sets", []), "sets", "at least 1"),
    "missing window": (lambda d: d["sets"][1].pop("window"), "sets.1.window", "required"),
    "missing model": (lambda d: d.pop("model"), "model", "required"),
    "unknown version": (lambda d: d.__setitem__("format_version", 7), "format_version", "unknown format version 7"),
    "NaN attention scale": (
        lambda d: d["sets"][2].__setitem__("attention_scale", float("nan")),
        "sets.2.attention_scale",
        "finite",
    ),
    "odd rotary dim": (lambda d: d["model"].__setitem__("rotary_dim", 7), "model.rotary_dim", "multiple of 2"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_refusal_names_the_field(case):
    edit, field, why = REFUSALS[case]
    with pytest.raises(FactorFileError) as info:
        parse_ladder(broken(edit))
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert why in message


@pytest.mark.parametrize("case", ["factor below 1", "windows not increasing", "unknown version"])
def test_validate_command_exits_2_naming_the_field(case, tmp_path, capsys):
    edit, field, _ = REFUSALS[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(broken(edit)))
    assert main(["factors", "validate", str(path)]) == 2
    assert field in capsys.readouterr().err


def test_validate_command_accepts_good_file(tmp_path, capsys):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(GOOD))
    assert main(["factors", "validate", str(path)]) == 0
    assert "3 sets" in capsys.readouterr().out


def test_not_json_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(FactorFileError, match="not JSON"):
        load_ladder(path)


def test_published_schema_matches_the_models():

    published = json.loads((REPO / "schemas" / "factor-set.schema.json").read_text())
    assert published == json_schema()


def test_show_prints_table_and_plots(tmp_path, capsys):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(GOOD))
    png = tmp_path / "factors.png"
    assert main(["factors", "show", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    for name in ("short", "mid", "long"):
        assert name in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
