"""The default model's factor file is what `longrope search` found, as its committed logs show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rope_ext.factors import load_ladder
from rope_ext.model_files import DEFAULT_LADDER

SEARCH = DEFAULT_LADDER.parent / "search"


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("stem, name, window", [("smollm2-short-8192", "short", 8192),
                                                ("smollm2-long-16384", "long", 16384),
                                                ("smollm2-long-32768", "long-32k", 32768)])
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


@pytest.mark.parametrize("stem", ["smollm2-long-16384", "smollm2-long-32768"])
def test_each_long_search_beat_every_baseline_it_started_from(stem):
    log = _log(SEARCH / f"{stem}.log.jsonl")
    seeds = {e["origin"]: e["ppl"] for e in log if e["origin"] in ("pi", "ntk", "yarn")}
    assert set(seeds) == {"pi", "ntk", "yarn"}
    assert min(e["ppl"] for e in log) < min(seeds.values())
