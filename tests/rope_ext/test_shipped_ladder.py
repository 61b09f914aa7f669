"""The default model's factor file is what `longrope search` found, as its committed logs show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rope_ext.factors import load_ladder
from rope_ext.models.smollm2 import DEFAULT_LADDER
from rope_ext.research.search import critical_dimension

pytestmark = pytest.mark.unit

SEARCH = DEFAULT_LADDER.parent / "search"


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("stem, name, window", [("smollm2-short-8192", "short", 8192),
                                                ("smollm2-long-16384-v2-reach225", "long", 16384),
                                                ("smollm2-long-32768-v2", "long-32k", 32768)])
def test_each_shipped_set_is_its_search_best(stem, name, window):
    shipped = load_ladder(DEFAULT_LADDER)
    fs = shipped.sets[shipped.index_of(name)]
    found = load_ladder(SEARCH / f"{stem}.json").sets[0]
    assert fs == found and fs.window == window
    log = _log(SEARCH / f"{stem}.log.jsonl")
    best = min(log, key=lambda e: e["ppl"])
    assert (best["factors"], best["n_hat"]) == (fs.factors, fs.n_hat)
    if "attention_scale" in best:  # a search that searched the scale ships the scale it found
        assert best["attention_scale"] == fs.attention_scale
    summary = json.loads((SEARCH / f"{stem}.summary.json").read_text())
    assert summary["evaluations"] == len(log) and summary["best"]["ppl"] == best["ppl"]
    seeds = [e for e in log if e["iteration"] == 0 and e["origin"] != "mutant"]
    assert seeds and all(best["ppl"] <= e["ppl"] for e in seeds)


@pytest.mark.parametrize("stem", ["smollm2-long-16384-v2-reach225", "smollm2-long-32768-v2"])
def test_each_long_search_started_from_the_baselines_projected_into_its_space(stem):
    log = _log(SEARCH / f"{stem}.log.jsonl")
    summary = json.loads((SEARCH / f"{stem}.summary.json").read_text())
    assert summary["space"]["mode"] == "v2" and summary["arguments"]["fitness"] == "ppl"
    # PI, NTK and YaRN project onto one genome there (critical dims at s, NTK's ramp below): logged once, as pi
    (seed,) = [e for e in log if e["origin"] in ("pi", "ntk", "yarn")]
    critical = summary["space"]["critical"]
    assert seed["iteration"] == 0 and min(seed["factors"][critical:]) == summary["space"]["bounds"][0]


def test_long_sets_stretch_every_dimension_that_never_turned_a_full_period():
    """Dimensions whose period exceeds W0 never saw an angle past W0·θ_i in training: a set for L
    tokens must divide them by at least L / W0, or a key far back lands out of distribution (the
    2026-12-02 passkey run: the v1 16k set, λ 1.62–1.98 there, lost every key more than 12k back)."""
    shipped = load_ladder(DEFAULT_LADDER)
    critical = critical_dimension(shipped.model)
    for fs in shipped.sets:
        s = max(fs.window / shipped.model.original_window, 1.0)
        assert min(fs.factors[critical:]) >= s, fs.name
