"""`longrope selftest`, the operators' proof on their own hardware, run here on CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rope_ext.selftest.run import compare_results
from rope_ext.selftest.workload import mixed_batch
from tests.helpers import REPO


@pytest.mark.engine
def test_selftest_passes_on_this_machine(tiny_model, tmp_path):
    """The tiny three-set batch (compiled and eager), then --model with a short and a long request."""
    model_dir, factors, _ = tiny_model
    result = subprocess.run(
        [Path(sys.executable).with_name("longrope"), "selftest", "--model", str(model_dir), "--workdir", str(tmp_path)],
        cwd=REPO, env={**os.environ, "LONGROPE_FACTORS": str(factors)},
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.endswith((" yes", " NO"))]
    table = {(model, mode, set_name): passed for model, mode, set_name, *_, passed in rows}
    for mode in ("compiled", "eager"):
        for set_name in ("short", "mid", "long"):
            assert table[("tiny", mode, set_name)] == "yes"
        # --model: a 32-token request (short) and one of W0 + 32 tokens (the next set, mid)
        assert table[(model_dir.name, mode, "short")] == table[(model_dir.name, mode, "mid")] == "yes"
    assert "selftest passed" in result.stdout


@pytest.mark.unit
def test_a_request_rotated_with_another_set_fails_its_row(tiny_model, tiny_reference):
    """The table can fail: short requests whose engine output is the long set's get pass = no."""
    ladder = tiny_model[2]
    requests = [r for r in mixed_batch() if len(r["prompt_token_ids"]) + r["max_tokens"] <= 256 and "rope_set" not in r]
    expected = [tiny_reference.run(r["prompt_token_ids"], r["max_tokens"], "short") for r in requests]
    wrong = [tiny_reference.run(r["prompt_token_ids"], r["max_tokens"], "long") for r in requests]
    results = [{"tokens": w.tokens, "token_logprobs": w.token_logprobs, "prompt_logprobs": w.prompt_logprobs}
               for w in wrong]
    rows = compare_results("tiny", "eager", ladder, requests, results, expected)
    assert [(row.set_name, row.requests, row.passed) for row in rows] == [("short", len(requests), False)]
    assert rows[0].max_delta > 1.0 and "request 0" in rows[0].problem
    same = [{"tokens": e.tokens, "token_logprobs": e.token_logprobs, "prompt_logprobs": e.prompt_logprobs}
            for e in expected]
    assert all(row.passed for row in compare_results("tiny", "eager", ladder, requests, same, expected))
