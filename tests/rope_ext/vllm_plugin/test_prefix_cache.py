"""docs/design.md, rule 4: prefix caching stays on, and no block computed under one set serves another."""

import pytest

from rope_ext.selftest.workload import PREFIX_TOKENS
from tests.helpers import assert_matches, expected_for

pytestmark = pytest.mark.engine


def test_shared_prefix_hits_only_within_its_set(plugin_engine, tiny_engine_model, tiny_engine_reference):
    first_mid, second_long, second_mid = (plugin_engine["results"][i] for i in plugin_engine["groups"]["prefix"])
    block = 32
    assert first_mid["num_cached_tokens"] == 0
    assert second_long["num_cached_tokens"] == 0  # same tokens, other set: no hit
    assert second_mid["num_cached_tokens"] == PREFIX_TOKENS // block * block  # same set: every full prefix block
    # the engine's own counter saw exactly the hits the requests report (the seeded wave has one too)
    reported = sum(r["num_cached_tokens"] or 0 for r in plugin_engine["results"])
    assert plugin_engine["metrics"]["vllm:prefix_cache_hits"] == reported


def test_prefix_requests_equal_their_references(plugin_engine, tiny_engine_model, tiny_engine_reference):
    for i in plugin_engine["groups"]["prefix"]:
        req = plugin_engine["requests"][i]
        set_name, ref = expected_for(tiny_engine_model[2], tiny_engine_reference, req)
        assert_matches(plugin_engine["results"][i], ref, f"request {i} ({set_name})", prompt_logprobs=False)
