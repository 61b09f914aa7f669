"""DESIGN.md rule 1 on the real engine: one batch, several sets, each request as if alone.

A tiny random-weight Llama (W0 = 256) with a three-step ladder; seven concurrent requests
of every set and length, prefills split into 128-token chunks; then four long decodes of two
sets in a KV cache small enough that they get preempted and recomputed; compiled mode (float32). Each request's greedy tokens
and logprobs equal the transformers reference for that request alone with its set. Then the
same batch on stock vLLM (plugin off) gives the short requests other results.
"""

import random

import pytest

from rope_ext.selection import choose_set
from tests.vllm_plugin.conftest import run_engine
from tests.vllm_plugin.reference import ReferenceModel

# One tolerance for every set: float32 vLLM CPU kernels against float32 transformers.
# Measured here: largest difference 5e-5 nats (a 600-token prompt in the long set).
LOGPROB_TOLERANCE = 2e-4

ENGINE = {
    "dtype": "float32",
    "max_model_len": 1024,
    "max_num_batched_tokens": 128,  # chunked prefill: every prompt over 128 tokens is split
    "max_num_seqs": 8,
    "enable_prefix_caching": True,
    "disable_log_stats": False,
    "seed": 0,
}


def batch() -> list[dict]:
    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, 49000) for _ in range(n)]

    return [
        {"prompt_token_ids": prompt(40), "max_tokens": 24},  # short
        {"prompt_token_ids": prompt(200), "max_tokens": 24},  # short, chunked
        {"prompt_token_ids": prompt(300), "max_tokens": 24},  # mid, chunked
        {"prompt_token_ids": prompt(600), "max_tokens": 24},  # long, chunked
        {"prompt_token_ids": prompt(100), "max_tokens": 24, "rope_set": "long"},  # pinned
        {"prompt_token_ids": prompt(230), "max_tokens": 40},  # mid by budget: 230 + 40 > 256
        {"prompt_token_ids": prompt(120), "max_tokens": 24, "rope_set": "mid"},  # pinned
    ]


def preempting_batch() -> list[dict]:
    """Four long decodes (350 tokens, 11 blocks each) that outgrow the 32-block cache together."""
    rng = random.Random(1)
    return [
        {"prompt_token_ids": [rng.randrange(100, 49000) for _ in range(150)], "max_tokens": 200, "rope_set": name}
        for name in ("mid", "long", "mid", "long")
    ]


def all_requests() -> list[dict]:
    return batch() + preempting_batch()


@pytest.fixture(scope="module")
def reference(tiny_model):
    model_dir, _, ladder = tiny_model
    return ReferenceModel(model_dir, ladder, 1024)


@pytest.fixture(scope="module")
def expected(tiny_model, reference):
    ladder = tiny_model[2]
    refs = []
    for req in all_requests():
        index = choose_set(ladder, len(req["prompt_token_ids"]), req["max_tokens"], pinned=req.get("rope_set"))
        refs.append((ladder.sets[index].name, reference.run(req["prompt_token_ids"], req["max_tokens"], ladder.sets[index].name)))
    return refs


@pytest.fixture(scope="module")
def plugin_run(tiny_model, tmp_path_factory):
    model_dir, factors, _ = tiny_model
    # 33 blocks of 32 tokens (one is vLLM's null block) hold one max_model_len request; the
    # second wave's decodes outgrow them, so the scheduler preempts and recomputes.
    engine = {**ENGINE, "block_size": 32, "num_gpu_blocks_override": 33}
    n = len(batch())
    waves = [list(range(n)), list(range(n, len(all_requests())))]
    spec = {"model": str(model_dir), "engine": engine, "requests": all_requests(), "waves": waves}
    return run_engine(spec, {"LONGROPE_FACTORS": str(factors)}, tmp_path_factory.mktemp("mixed"), "plugin")


def test_batch_covers_every_set(expected):
    assert {name for name, _ in expected} == {"short", "mid", "long"}


def test_each_request_equals_its_reference_alone(plugin_run, expected):
    for i, ((set_name, ref), got) in enumerate(zip(expected, plugin_run["results"])):
        where = f"request {i} ({set_name})"
        assert got["tokens"] == ref.tokens, where
        assert got["token_logprobs"] == pytest.approx(ref.token_logprobs, abs=LOGPROB_TOLERANCE), where
        assert got["prompt_logprobs"] == pytest.approx(ref.prompt_logprobs, abs=LOGPROB_TOLERANCE), where


def test_the_run_was_preempted(plugin_run):
    assert plugin_run["metrics"]["vllm:num_preemptions"] > 0


def test_stock_vllm_gives_short_requests_other_results(tiny_model, expected, tmp_path_factory):
    """Plugin off: vLLM 0.32 uses the long factors for every request once max_model_len > W0."""
    model_dir, _, _ = tiny_model
    spec = {"model": str(model_dir), "engine": {**ENGINE, "enforce_eager": True}, "requests": batch()}
    stock = run_engine(spec, {"LONGROPE_PLUGIN": "0"}, tmp_path_factory.mktemp("stock"), "stock")
    short = [(ref, got) for (name, ref), got in zip(expected, stock["results"]) if name == "short"]  # first wave
    assert short
    for ref, got in short:
        worst = max(abs(a - b) for a, b in zip(ref.prompt_logprobs, got["prompt_logprobs"]))
        assert worst > 100 * LOGPROB_TOLERANCE
