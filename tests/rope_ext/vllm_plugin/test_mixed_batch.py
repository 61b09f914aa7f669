"""docs/design.md, rule 1 on the real engine: one batch, several sets, each request as if alone.

A tiny random-weight Llama (W0 = 256) with a three-step ladder; seven concurrent requests of
every set and length, prefills split into 128-token chunks; then four long decodes of two
sets in a KV cache small enough that they get preempted and recomputed; compiled mode
(float32). Each request's greedy tokens and logprobs equal the transformers reference for
that request alone with its set (up to the reference's first near-tie: see reference.py).
Then the same batch on stock vLLM (plugin off) gives the short requests other results.
"""

import pytest

from rope_ext.selftest.reference import LOGPROB_TOLERANCE
from rope_ext.selftest.workload import ENGINE, mixed_batch
from tests.helpers import assert_matches, expected_for, run_engine

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def expected_mixed(tiny_engine_model, tiny_engine_reference):
    return [expected_for(tiny_engine_model[2], tiny_engine_reference, req) for req in mixed_batch()]


def test_batch_covers_every_set(expected_mixed):
    assert {name for name, _ in expected_mixed} == {"short", "mid", "long"}


def test_each_request_equals_its_reference_alone(plugin_engine, expected_mixed):
    results = [plugin_engine["results"][i] for i in plugin_engine["groups"]["mixed"]]
    for i, ((set_name, ref), got) in enumerate(zip(expected_mixed, results)):
        assert_matches(got, ref, f"request {i} ({set_name})")


def test_preempted_requests_equal_their_references(plugin_engine, tiny_engine_model, tiny_engine_reference):
    assert plugin_engine["metrics"]["vllm:num_preemptions"] > 0
    for i in plugin_engine["groups"]["preempting"]:
        req = plugin_engine["requests"][i]
        set_name, ref = expected_for(tiny_engine_model[2], tiny_engine_reference, req)
        assert_matches(plugin_engine["results"][i], ref, f"request {i} ({set_name})")


def test_stock_vllm_gives_short_requests_other_results(tiny_engine_model, expected_mixed, vllm_runner,
                                                       tmp_path_factory):
    """Plugin off: vLLM uses the long factors for every request once max_model_len > W0."""
    model_dir, _, _ = tiny_engine_model
    spec = {"model": str(model_dir), "engine": {**ENGINE, "enforce_eager": True}, "requests": mixed_batch()}
    stock = run_engine(spec, {"LONGROPE_PLUGIN": "0"}, tmp_path_factory.mktemp("stock"), "stock", vllm_runner)
    short = [(ref, got) for (name, ref), got in zip(expected_mixed, stock["results"]) if name == "short"]
    assert short
    for ref, got in short:
        worst = max(abs(a - b) for a, b in zip(ref.prompt_logprobs, got["prompt_logprobs"]))
        assert worst > 100 * LOGPROB_TOLERANCE


def test_seeded_chunked_prompt_survives_and_repeats(plugin_engine):
    first, again = (plugin_engine["results"][i] for i in plugin_engine["groups"]["seeded"])
    assert len(first["tokens"]) == 16
    assert first["tokens"] == again["tokens"]
