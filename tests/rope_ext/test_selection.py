"""The regime rule (docs/design.md, rules 2 and 5) on a three-step ladder."""

import pytest

from rope_ext.factors import parse_ladder
from rope_ext.selection import ContextLengthExceeded, Policy, UnknownSet, admit, choose_set, engine_set
from tests.helpers import GOOD  # windows 256, 512, 1024

pytestmark = pytest.mark.unit

LADDER = parse_ladder(GOOD)


@pytest.mark.parametrize(
    "prompt,max_tokens,expected",
    [(10, 10, 0), (200, 56, 0), (200, 57, 1), (255, 1, 0), (256, 1, 1), (500, 524, 2)],
)
def test_budget_takes_smallest_set_holding_prompt_and_max_tokens(prompt, max_tokens, expected):
    assert choose_set(LADDER, prompt, max_tokens, Policy.BUDGET) == expected


@pytest.mark.parametrize("prompt,max_tokens,expected", [(200, 500, 0), (255, 700, 0), (256, 10, 1), (600, 100, 2)])
def test_dynamic_starts_in_smallest_set_holding_prompt_plus_one(prompt, max_tokens, expected):
    assert choose_set(LADDER, prompt, max_tokens, Policy.DYNAMIC) == expected


@pytest.mark.parametrize("policy", list(Policy))
def test_request_no_set_can_hold_is_refused(policy):
    with pytest.raises(ContextLengthExceeded) as info:
        choose_set(LADDER, 1000, 25, policy)
    assert info.value.limit == 1024
    assert "1025 tokens" in str(info.value) and "1000 in the prompt" in str(info.value)


def test_pinned_set_is_used_when_it_holds_the_request():
    assert choose_set(LADDER, 10, 10, Policy.DYNAMIC, pinned="long") == 2


def test_pinned_set_too_small_is_refused():
    with pytest.raises(ContextLengthExceeded, match=r"context length of factor set 'short' \(256 tokens\)"):
        choose_set(LADDER, 250, 10, pinned="short")


def test_unknown_pinned_set():
    with pytest.raises(UnknownSet, match="no factor set named 'huge'"):
        choose_set(LADDER, 1, 1, pinned="huge")


def test_engine_rule_is_pinned_else_budget(tiny_model):
    """The plugin's own rule under plain `vllm serve`: the pinned set, else the smallest that holds the budget."""
    ladder = tiny_model[2]
    assert engine_set(ladder, 100, 10) == 0
    assert engine_set(ladder, 100, 200) == 1
    assert engine_set(ladder, 100, 10, "long") == 2


@pytest.mark.parametrize("prompt,max_tokens,lead,expected,promotable", [
    (250, 100, 0, 0, True),  # the window rule: short holds prompt + 1
    (250, 100, 10, 1, False),  # 6 tokens of room < a lead of 10: mid, which holds it all
    (250, 400, 10, 1, True),  # mid, still promoted later (650 > 512)
    (100, 300, 10, 0, True),  # 156 tokens of room: stays short, promoted later
    (250, 500, 2000, 2, False),  # no set has that much room: the largest
    (250, 5, 10, 0, False),  # fits short: never promoted, the lead does not matter
])
def test_a_request_too_close_to_its_window_starts_where_its_switch_can_be_hidden(prompt, max_tokens, lead, expected,
                                                                               promotable):
    admission = admit(LADDER, prompt, max_tokens, Policy.DYNAMIC, lead=lead)
    assert (admission.index, admission.promotable) == (expected, promotable)
    assert admit(LADDER, prompt, max_tokens, Policy.DYNAMIC, pinned="short" if prompt + max_tokens <= 256 else "long",
                 lead=lead).promotable is False  # pinned: the lead never moves it


def test_a_huge_set_name_is_cut_in_the_refusal():
    """A client's 1.5 MB rope_set value came back whole in the 400; the refusal shows its first characters."""
    with pytest.raises(UnknownSet) as info:
        choose_set(LADDER, 10, 10, pinned="x" * 1_500_000)
    assert len(str(info.value)) < 200 and "'xxxx" in str(info.value)
