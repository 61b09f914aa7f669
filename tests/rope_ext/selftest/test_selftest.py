"""`longrope selftest`, the operators' proof on their own hardware, run here on CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rope_ext.models.tiny import TINY_W0, build_tiny_phi3
from rope_ext.selftest.run import MODES, Row, compare_results, modes_for, require_drafts
from rope_ext.selftest.workload import batch_size_waves, mixed_batch
from tests.helpers import REPO


@pytest.mark.engine
def test_selftest_passes_on_this_machine(vllm_runner, tmp_path):
    """--compare-modes: the tiny three-set batch compiled, eager and with ngram speculation (drafts proposed);
    then --model on a Phi-4-mini shaped model (partial rotary 0.75, its config in transformers v4 layout, as the
    real one ships) with its own longrope config as the ladder: a short and a long request. Under V2 (its
    kernels interpreted, slow) the Phi shapes are left to the next test, which keeps CI's V2 run in its time."""
    phi = build_tiny_phi3(tmp_path, None, "phi-4-mini-instruct", "v4")
    model = ["--model", str(phi)] if vllm_runner == "V1" else []
    env = {k: v for k, v in os.environ.items() if k != "LONGROPE_FACTORS"}
    result = subprocess.run(
        [Path(sys.executable).with_name("longrope"), "selftest", "--compare-modes", *model,
         "--workdir", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.endswith((" yes", " NO"))]
    table = {(model, mode, set_name): passed for model, mode, _, set_name, *_, passed in rows}
    assert {runner for _, _, runner, *_ in rows} == {vllm_runner}, result.stdout
    assert {mode for model, mode, _ in table if model == "tiny"} == {"compiled", "eager", "ngram"}  # no async on CPU
    for mode in ("compiled", "eager", "ngram"):
        for set_name in ("short", "mid", "long"):
            assert table[("tiny", mode, set_name)] == "yes"
    drafted = re.search(r"^tiny ngram short: (\d+) of (\d+) draft tokens accepted", result.stdout, re.M)
    assert drafted and int(drafted.group(2)) > 0, result.stdout
    for mode in ("compiled", "eager") if model else ():  # the Phi model's pair: 32 tokens, and W0 + 32
        assert table[(phi.name[:16], mode, "short")] == table[(phi.name[:16], mode, "long")] == "yes"
    assert "selftest passed" in result.stdout


@pytest.mark.engine
def test_the_model_check_passes_on_a_phi35_shape_in_the_v5_layout(vllm_runner, tmp_path, monkeypatch):
    """The selftest's --model check on the other Phi shape: full rotary (Phi-3.5-mini's head_dim 96), its config
    in transformers' v5 layout, with short and long mscales, its own longrope config the ladder. Eager only:
    the selftest above runs the compiled model check on the first shape."""
    from rope_ext.selftest.run import Progress, model_check

    monkeypatch.delenv("LONGROPE_FACTORS", raising=False)
    phi = build_tiny_phi3(tmp_path, None, "phi-3.5-mini-instruct", "v5", (1.05, 1.25))
    (tmp_path / "work").mkdir()
    rows = model_check(phi, tmp_path / "work", Progress(), {}, {"eager": MODES["eager"]})
    assert {(row.mode, row.set_name) for row in rows} == {("eager", "short"), ("eager", "long")}
    for row in rows:
        assert row.passed and row.runner == vllm_runner, row


@pytest.mark.unit
def test_a_request_rotated_with_another_set_fails_its_row(tiny_engine_model, tiny_engine_reference):
    """The table can fail: short requests whose engine output is the long set's get pass = no."""
    ladder = tiny_engine_model[2]
    requests = [r for r in mixed_batch()
                if len(r["prompt_token_ids"]) + r["max_tokens"] <= TINY_W0 and "rope_set" not in r]
    expected = [tiny_engine_reference.run(r["prompt_token_ids"], r["max_tokens"], "short") for r in requests]
    wrong = [tiny_engine_reference.run(r["prompt_token_ids"], r["max_tokens"], "long") for r in requests]
    results = [{"tokens": w.tokens, "token_logprobs": w.token_logprobs, "prompt_logprobs": w.prompt_logprobs}
               for w in wrong]
    rows = compare_results("tiny", "eager", ladder, requests, results, expected)
    assert [(row.set_name, row.requests, row.passed) for row in rows] == [("short", len(requests), False)]
    assert rows[0].max_delta > 1.0 and "request 0" in rows[0].problem
    same = [{"tokens": e.tokens, "token_logprobs": e.token_logprobs, "prompt_logprobs": e.prompt_logprobs}
            for e in expected]
    assert all(row.passed for row in compare_results("tiny", "eager", ladder, requests, same, expected))


@pytest.mark.unit
def test_compare_modes_add_what_the_device_has():
    """Async scheduling and CUDA graphs exist on CUDA only; ngram speculation everywhere; without the flag,
    compiled and eager."""
    assert modes_for("cpu", False) == modes_for("cuda", False) == MODES == {"compiled": {},
                                                                           "eager": {"enforce_eager": True}}
    assert list(modes_for("cpu", True)) == ["compiled", "eager", "ngram"]
    assert list(modes_for("cuda", True)) == ["compiled", "eager", "no-async", "piecewise", "ngram"]
    assert modes_for("cuda", True)["no-async"] == {"async_scheduling": False}
    assert modes_for("cuda", True)["piecewise"] == {"compilation_config": {"cudagraph_mode": "PIECEWISE"}}
    assert modes_for("cpu", True)["ngram"]["speculative_config"]["method"] == "ngram"


@pytest.mark.unit
def test_batch_size_waves_decode_together_in_every_set():
    waves = batch_size_waves((1, 3, 5, 17, 33))
    assert [len(wave) for wave in waves] == [1, 3, 5, 17, 33]
    assert [r["rope_set"] for r in waves[2]] == ["short", "mid", "long", "short", "mid"]
    assert all(len(r["prompt_token_ids"]) + r["max_tokens"] <= TINY_W0 for wave in waves for r in wave)


@pytest.mark.unit
def test_a_speculation_row_fails_when_no_draft_was_proposed():
    idle = [Row("tiny", "ngram", "short", requests=2)]
    require_drafts(idle, {"vllm:spec_decode_num_draft_tokens": 0, "vllm:spec_decode_num_accepted_tokens": 0})
    assert not idle[0].passed and "proposed no draft" in idle[0].problem
    busy = [Row("tiny", "ngram", "short", requests=2)]
    require_drafts(busy, {"vllm:spec_decode_num_draft_tokens": 6, "vllm:spec_decode_num_accepted_tokens": 2})
    assert busy[0].passed and busy[0].note.startswith("2 of 6 draft tokens accepted")
