"""Scoring forward, perplexity, passkey and `longrope eval` / `longrope search` on real models.

The tiny random model keeps the CLI runs to seconds; SmolLM2 (short inputs) proves the
scoring path equals what transformers computes and that passkey retrieval works at all.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from longrope.cli import main
from rope_ext.baselines import plain_set
from rope_ext.factors import default_attention_scale, load_ladder
from rope_ext.models.tiny import TINY_MAX_LEN, TINY_W0
from rope_ext.research.corpus import BOOKS_DIR
from rope_ext.research.evaluation import Measurements, load_model, method_sets, passkey_report, perplexity_report
from rope_ext.research.jsonl_rows import read_rows
from rope_ext.research.passkey import (
    last_tokens,
    needle_samples,
    passkey_sample,
    passkey_trials,
    spread_depths,
    trial_plan,
    wilson_interval,
)
from rope_ext.research.perplexity import Sample, documents, perplexity, sliding_perplexity

pytestmark = pytest.mark.slow

BOOK = BOOKS_DIR / "moby-dick.txt"


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(smollm2_dir, 4096)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    model_dir, factors, ladder = tiny_model
    model, tokenizer = load_model(model_dir, TINY_MAX_LEN)
    return model, tokenizer, ladder, model_dir, factors


def test_fast_scoring_equals_a_plain_transformers_forward(smollm2):
    model, tokenizer = smollm2
    ids = documents(tokenizer, BOOK, 3000)[0].ids  # crosses the 2048-row scoring chunk
    model.use(None)
    plain = model.token_nll_plain_forward(ids)
    model.use(plain_set(model.info))  # our tables, λ = 1: must be the model's own RoPE
    fast, top1 = model.token_scores(ids)
    assert fast.shape == plain.shape == (2999,)
    assert torch.allclose(fast, plain, atol=1e-3)
    assert 0.2 < top1.float().mean() < 0.8  # a real model predicts some tokens, not all


def test_perplexity_reports_positions_past_w0_apart(tiny):
    model, tokenizer, ladder, *_ = tiny
    sample = documents(tokenizer, BOOK, 2 * TINY_W0)[0]
    result = perplexity(model, ladder.sets[1], [sample])
    nll = model.token_nll(sample.ids)  # still rotated with ladder.sets[1]
    assert result.tokens == 2 * TINY_W0 - 1
    assert result.all == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    # nll[j] predicts position j + 1: positions >= W0 are nll[W0 - 1:].
    assert result.past_w0 == pytest.approx(math.exp(nll[TINY_W0 - 1 :].mean()), rel=1e-5)
    short = perplexity(model, ladder.sets[1], [Sample(sample.ids[:100])])
    assert short.past_w0 is None


def test_sliding_perplexity_scores_every_position_past_w0_once(tiny):
    model, tokenizer, *_ = tiny
    length = 3 * TINY_W0 + 37  # the last block is short
    sample = documents(tokenizer, BOOK, length)[0]
    floor = sliding_perplexity(model, [sample], window=TINY_W0, stride=TINY_W0 // 4)
    assert floor.tokens == length - TINY_W0
    assert floor.all == floor.past_w0
    # A window holding the whole sample cuts nothing: one full forward's past-W0 perplexity.
    uncut = sliding_perplexity(model, [sample], window=length, stride=100)
    full = perplexity(model, None, [sample])
    assert uncut.tokens == floor.tokens
    assert uncut.past_w0 == pytest.approx(full.past_w0, rel=1e-5)
    assert floor.past_w0 != pytest.approx(full.past_w0, rel=1e-3)  # the cut context shows


def test_sliding_perplexity_by_hand(tiny):
    """W0 = 256, 356 tokens, window 128, stride 48: three forwards, each scoring only its new tokens."""
    model, tokenizer, *_ = tiny
    sample = documents(tokenizer, BOOK, TINY_W0 + 100)[0]
    model.use(None)
    # (window start, window end): scored positions are the last ones, from 256 on, 48 at a time.
    blocks = [(176, 304, 48), (224, 352, 48), (228, 356, 4)]
    nll = torch.cat([model.token_nll(sample.ids[start:end])[-scored:] for start, end, scored in blocks])
    floor = sliding_perplexity(model, [sample], window=128, stride=48)
    assert floor.tokens == 100 == nll.numel()
    assert floor.past_w0 == pytest.approx(math.exp(nll.mean()), rel=1e-6)
    with pytest.raises(ValueError, match="each block needs context"):
        sliding_perplexity(model, [sample], window=128, stride=128)
    with pytest.raises(ValueError, match="nothing to measure"):
        sliding_perplexity(model, [Sample(sample.ids[:TINY_W0])], window=128, stride=32)


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0  # never off the rate by an ulp
    assert wilson_interval(1, 2) == pytest.approx((0.0945, 0.9055), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_spread_depths_cover_the_window_and_keys_repeat_across_cells():
    assert spread_depths(10) == pytest.approx([0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95])
    plan = trial_plan(spread_depths(10), 1, seed=0)
    assert [d for d, _ in plan] == spread_depths(10) and len({k for _, k in plan}) == 10
    assert trial_plan(spread_depths(10), 1, seed=0) == plan
    assert [d for d, _ in trial_plan([0.2, 0.8], 2, seed=0)] == [0.2, 0.8, 0.2, 0.8]
    bigger = trial_plan(spread_depths(10), 3, seed=0)
    assert bigger[:10] == plan and len({k for _, k in bigger}) == 30  # more keys per depth re-measure none


def test_documents_are_consecutive_chunks_and_refuse_short_books(tiny, tmp_path):
    _, tokenizer, *_ = tiny
    chunks = documents(tokenizer, BOOK, 500, per_book=3)
    assert [len(c.ids) for c in chunks] == [500, 500, 500]
    assert not torch.equal(chunks[0].ids, chunks[1].ids)
    (tmp_path / "tiny.txt").write_text("far too short")
    with pytest.raises(ValueError, match="has 500 tokens"):
        documents(tokenizer, tmp_path, 500)


def test_passkey_sample_hides_the_key_at_its_depth(tiny):
    _, tokenizer, *_ = tiny
    sample = passkey_sample(tokenizer, 1000, 0.25, 48213)
    assert len(sample.ids) == 1000
    answer = sample.ids[1:][sample.scored]
    assert tokenizer.decode(answer).strip() == "48213"
    text = tokenizer.decode(sample.ids)
    needle = text.index("The pass key is 48213")
    assert 0.15 < needle / len(text) < 0.35
    assert text.rstrip().endswith("What is the pass key? The pass key is 48213")


def test_smollm2_finds_a_passkey_inside_its_window(smollm2):
    model, tokenizer = smollm2
    trials = passkey_trials(model, tokenizer, plain_set(model.info), [1024], [0.2, 0.8], trials=2, seed=0)
    assert len({t.key for t in trials}) == 4
    assert sum(t.passed for t in trials) >= 3


def test_method_sets_follow_the_regime_rule(tiny):
    *_, ladder, _, _ = tiny
    at_mid = method_sets(ladder, 2 * TINY_W0)
    assert at_mid["ladder"] is ladder.sets[1]  # 511 prompt tokens + 1 fit "mid" exactly
    assert at_mid["pi"].factors == [4.0] * 32  # static: built for the ladder's longest window
    beyond = method_sets(ladder, 2 * TINY_MAX_LEN)
    assert "ladder" not in beyond and beyond["pi"].factors == [8.0] * 32


def test_eval_ppl_command_writes_json_and_png(tiny, tmp_path):
    *_, model_dir, factors = tiny
    out = tmp_path / "ppl.json"
    code = main(["eval", "ppl", "--model", str(model_dir), "--factors", str(factors), "--lengths", "256,512",
                 "--data", str(BOOK), "-o", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    rows = {(r["length"], r["method"]): r for r in report["results"]}
    expected = {"plain", "pi", "ntk", "yarn", "set:short", "set:mid", "set:long", "ladder"}
    assert {m for length, m in rows if length == 512} == expected
    assert rows[(512, "ladder")]["ppl"] == rows[(512, "set:mid")]["ppl"]
    assert rows[(256, "ladder")]["ppl"] == rows[(256, "set:short")]["ppl"] == rows[(256, "plain")]["ppl"]
    assert rows[(256, "plain")]["ppl_past_w0"] is None and rows[(512, "plain")]["ppl_past_w0"] > 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_eval_passkey_command_writes_json_and_png(tiny, tmp_path):
    *_, model_dir, factors = tiny
    out = tmp_path / "passkey.json"
    code = main(["eval", "passkey", "--model", str(model_dir), "--factors", str(factors), "--lengths", "256,1024",
                 "--depths", "0.5", "--trials", "2", "--methods", "plain,ladder", "-o", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert {(r["length"], r["method"]) for r in report["results"]} == {
        (256, "plain"), (256, "ladder"), (1024, "plain"), (1024, "ladder")}
    assert all(len(r["trials"]) == 2 and 0.0 <= r["accuracy"] <= 1.0 for r in report["results"])
    assert out.with_suffix(".png").exists()


def test_eval_ppl_sliding_floor_only_past_w0(tiny, tmp_path):
    *_, model_dir, factors = tiny
    out = tmp_path / "ppl.json"
    code = main(["eval", "ppl", "--model", str(model_dir), "--factors", str(factors), "--lengths", "256,512",
                 "--data", str(BOOK), "--methods", "plain,sliding", "-o", str(out)])
    assert code == 0
    rows = {(r["length"], r["method"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {(256, "plain"), (512, "plain"), (512, "sliding")}
    floor = rows[(512, "sliding")]
    assert floor["ppl"] is None and floor["ppl_past_w0"] > 0
    assert (floor["tokens"], floor["window"], floor["stride"]) == (512 - TINY_W0, TINY_W0, TINY_W0 // 4)


def test_passkey_sliding_floor_sees_the_last_w0_tokens(tiny, tmp_path):
    model, tokenizer, _, _, factors = tiny
    deep, near = passkey_sample(tokenizer, 1024, 0.1, 12345), passkey_sample(tokenizer, 1024, 0.95, 12345)
    needle = tokenizer(" The pass key is 12345.", add_special_tokens=False)["input_ids"]

    def holds(ids: list[int]) -> bool:
        return any(ids[i : i + len(needle)] == needle for i in range(len(ids)))

    cut = last_tokens(deep, TINY_W0)
    assert len(cut.ids) == TINY_W0 and cut.scored.sum() == deep.scored.sum() and cut.scored[-1]
    assert holds(deep.ids.tolist()) and not holds(cut.ids.tolist())  # 0.9 · 1024 tokens back: out of sight
    assert holds(last_tokens(near, TINY_W0).ids.tolist())

    report = passkey_report(model, tokenizer, factors, [TINY_W0, 1024], [0.1, 0.95], 1, 0, ["plain", "sliding"])
    rows = {(r["length"], r["method"]): r for r in report["results"]}
    assert set(rows) == {(TINY_W0, "plain"), (1024, "plain"), (1024, "sliding")}  # no floor within W0
    assert rows[(1024, "sliding")]["set"] == "plain" and rows[(1024, "sliding")]["context"] == TINY_W0
    assert rows[(1024, "sliding")]["trials"][0]["passed"] is False  # its key was cut off


def test_eval_passkey_depth_count_spreads_one_key_per_depth(tiny, tmp_path):
    *_, model_dir, factors = tiny
    out = tmp_path / "passkey.json"
    code = main(["eval", "passkey", "--model", str(model_dir), "--factors", str(factors), "--lengths", "256",
                 "--depth-count", "4", "--trials", "1", "--methods", "plain", "-o", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["depths"] == [0.125, 0.375, 0.625, 0.875] and report["trials_per_cell"] == 4
    (row,) = report["results"]
    assert [t["depth"] for t in row["trials"]] == report["depths"]
    assert row["n"] == 4 and row["passed"] == sum(t["passed"] for t in row["trials"])
    assert row["interval"] == list(wilson_interval(row["passed"], 4))


def test_reports_resume_from_their_measurements_file(tiny, tmp_path, monkeypatch):
    model, tokenizer, _, _, factors = tiny
    rows = tmp_path / "rows.jsonl"
    ppl = perplexity_report(model, tokenizer, factors, BOOK, [512], 1, ["set:mid", "ladder", "sliding"],
                            Measurements(rows))
    passkey = passkey_report(model, tokenizer, factors, [256], [0.3, 0.7], 1, 0, ["plain"], Measurements(rows))
    assert len(rows.read_text().splitlines()) == 2 + 2  # ladder at 512 *is* set:mid: measured once
    with rows.open("a") as f:
        f.write('{"key": "cut short by a ki')  # a kill mid-write loses that line only

    def no_forward(*args, **kwargs):
        raise AssertionError("a finished measurement was computed again")

    monkeypatch.setattr(model, "token_scores", no_forward)
    again = Measurements(rows)
    assert perplexity_report(model, tokenizer, factors, BOOK, [512], 1, ["set:mid", "ladder", "sliding"],
                             again)["results"] == ppl["results"]
    assert passkey_report(model, tokenizer, factors, [256], [0.3, 0.7], 1, 0, ["plain"], again) == passkey


def _search(model_dir, out, cache, iterations: int, mode: str = "v1", extra: tuple[str, ...] = ()) -> list[dict]:
    code = main(["search", "--model", str(model_dir), "--window", "1024", "--data", str(BOOK), "-o", str(out),
                 "--population", "5", "--iterations", str(iterations), "--parents", "3", "--mutations", "2",
                 "--crossovers", "1", "--seed", "1", "--cache", str(cache), "--mode", mode, *extra])
    assert code == 0
    return [json.loads(line) for line in out.with_name(out.stem + ".log.jsonl").read_text().splitlines()]


def test_search_command_writes_the_best_set_and_resumes_from_its_cache(tiny, tmp_path):
    model, tokenizer, _, model_dir, _ = tiny
    out, cache = tmp_path / "long.json", tmp_path / "cache.jsonl"
    first = _search(model_dir, out, cache, iterations=1)
    assert [e["origin"] for e in first[:3]] == ["pi", "ntk", "yarn"]
    assert all(e["seconds"] > 0 for e in first)
    found = load_ladder(out)
    best = min(first, key=lambda e: e["ppl"])
    assert found.sets[0].name == "long" and found.sets[0].window == 1024
    assert found.sets[0].factors == best["factors"] and found.sets[0].n_hat == best["n_hat"]
    # The logged fitness is the perplexity of that set, recomputed independently.
    again = perplexity(model, found.sets[0], documents(tokenizer, BOOK, 1024))
    assert again.all == pytest.approx(best["ppl"], rel=1e-5)

    # A longer run with the same seed replays the first run from the cache, then goes on; a record
    # cut short by a kill (the last line, half written) is skipped, not a reason to refuse the cache.
    with cache.open("a") as f:
        f.write('{"context": "')
    second = _search(model_dir, out, cache, iterations=2)
    assert [e["factors"] for e in second[: len(first)]] == [e["factors"] for e in first]
    assert all(e["seconds"] == 0 for e in second[: len(first)])
    assert any(e["seconds"] > 0 for e in second[len(first) :])
    summary = json.loads(out.with_name("long.summary.json").read_text())
    assert summary["best"]["ppl"] == min(e["ppl"] for e in second)
    # Only the cut line is lost: the evaluation written after it starts a line of its own.
    computed = [e for e in first + second if e["seconds"] > 0]
    assert len(list(read_rows(cache))) == len(computed) == len(cache.read_text().splitlines()) - 1


def test_search_below_the_original_window_is_refused_before_any_evaluation(tiny, tmp_path, capsys):
    model_dir = tiny[3]
    out = tmp_path / "short.json"
    code = main(["search", "--model", str(model_dir), "--window", "128", "--data", str(BOOK), "-o", str(out)])
    assert code == 2 and "below the model's original window 256" in capsys.readouterr().err
    assert not out.exists() and not out.with_name("short.log.jsonl").exists()


def test_scale_search_finds_a_known_better_scale_on_the_tiny_model(tiny, tmp_path):
    """Text sampled from the model rotated with PI's λ at attention scale 1.4 is likeliest near 1.4. With
    λ held at PI's (bounds [4, 4]), a search that varies the scale finds it and beats the seed, which
    carries the formula's 1.118."""
    from rope_ext.research.search import SearchConfig, SearchSpace
    from rope_ext.research.search_run import SearchRun, search_summary

    model, _, ladder, *_ = tiny
    pi = method_sets(ladder, 1024)["pi"]
    assert set(pi.factors) == {4.0}
    model.use(pi.model_copy(update={"attention_scale": 1.4}))
    torch.manual_seed(0)
    with torch.inference_mode():
        ids = model.model.generate(torch.tensor([[1]]), do_sample=True, top_k=0, temperature=1.0,
                                   max_new_tokens=1023, min_new_tokens=1023)[0]
    samples = [Sample(ids)]
    formula = round(default_attention_scale(1024, TINY_W0), 3)
    known = {s: perplexity(model, pi.model_copy(update={"attention_scale": s}), samples).all for s in (formula, 1.4)}
    assert known[1.4] < known[formula] * 0.9  # the premise, measured: 1.4 is far better than the formula

    space = SearchSpace.for_model(model.info, 1024, lower=4.0, upper=4.0, scale_bounds=(1.0, 2.0))
    config = SearchConfig(population=6, iterations=8, parents=3, mutations=3, crossovers=1, seed=1, scale_sigma=0.1)
    run = SearchRun(model, samples, 1024, space, config, tmp_path / "cache.jsonl", tmp_path / "log.jsonl", "long")
    found, result = run.run()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    seeds = [e for e in log if e["origin"] in ("pi", "ntk", "yarn")]
    assert [e["attention_scale"] for e in seeds] == [formula]  # NTK and YaRN clip to PI's λ: one seed
    assert result.best.ppl < seeds[0]["ppl"]
    assert abs(found.sets[0].attention_scale - 1.4) < 0.1
    assert perplexity(model, found.sets[0], samples).all == pytest.approx(result.best.ppl, rel=1e-5)
    summary = search_summary(result, config, space)
    assert summary["space"]["scale_bounds"] == [1.0, 2.0]
    assert summary["best"]["attention_scale"] == found.sets[0].attention_scale


def test_v2_search_scores_only_needle_answers(tiny, tmp_path):
    model, tokenizer, _, model_dir, _ = tiny
    log = _search(model_dir, tmp_path / "v2.json", tmp_path / "cache.jsonl", iterations=1, mode="v2")
    found = load_ladder(tmp_path / "v2.json").sets[0]
    assert all(4.0 <= v <= 8.0 for v in found.factors[-5:]) and found.n_hat == 0  # s = 4: [s, 2s]
    samples = needle_samples(tokenizer, BOOK, 1024, 1, seed=1)
    assert int(samples[0].scored.sum()) == len(tokenizer(" 12345", add_special_tokens=False)["input_ids"])
    assert perplexity(model, found, samples).all == pytest.approx(min(e["ppl"] for e in log), rel=1e-5)


def test_v2_space_with_document_perplexity(tiny, tmp_path):
    model, tokenizer, _, model_dir, _ = tiny
    log = _search(model_dir, tmp_path / "v2.json", tmp_path / "cache.jsonl", iterations=1, mode="v2",
                  extra=("--fitness", "ppl"))
    found = load_ladder(tmp_path / "v2.json").sets[0]
    assert all(4.0 <= v <= 8.0 for v in found.factors[-5:]) and found.n_hat == 0  # the v2 space still
    samples = documents(tokenizer, BOOK, 1024, 1)  # but every token of the document scored
    assert perplexity(model, found, samples).all == pytest.approx(min(e["ppl"] for e in log), rel=1e-5)


def test_merge_makes_one_ladder(tiny, tmp_path):
    *_, ladder, _, _ = tiny
    out = tmp_path / "merged.json"
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    from rope_ext.factors import save_ladder

    save_ladder(ladder.model_copy(update={"sets": ladder.sets[2:]}), two)
    save_ladder(ladder.model_copy(update={"sets": ladder.sets[:2]}), one)
    assert main(["factors", "merge", str(two), str(one), "-o", str(out)]) == 0
    assert load_ladder(out).names == ["short", "mid", "long"]

