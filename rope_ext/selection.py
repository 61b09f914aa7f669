"""The regime rules: which factor set a request starts in, how far it may go there, where it moves next.

The one place they are decided (docs/design.md, rules 2, 3, 5 and 6): the server's engine client
calls :func:`admit` once per request and :func:`segment_tokens` / :func:`next_set` as a request is
promoted; the engine plugin calls :func:`engine_set` for every request that reaches it, so the two
sides can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from rope_ext.factors import Ladder
from rope_ext.protocol import ContextLengthExceeded, UnknownSet


class Policy(str, Enum):
    """dynamic: start in the smallest set that holds the prompt, promote later; budget: hold it all, never move."""

    DYNAMIC = "dynamic"
    BUDGET = "budget"


@dataclass(frozen=True)
class Admission:
    index: int  # the set the request starts in
    promotable: bool  # it may reach that set's window with tokens left to generate, and then move up


def choose_set(ladder: Ladder, prompt_tokens: int, max_tokens: int, policy: Policy = Policy.BUDGET,
               pinned: Any = None) -> int:
    """Index of the set a request starts in.

    Every request must fit the ladder as a whole (prompt + max_tokens <= the largest window);
    a pinned set must hold the whole request by itself. Under ``dynamic`` the start set only
    needs room for the prompt and one token; promotion takes it further.
    """
    needed = prompt_tokens + max_tokens
    if pinned is not None:
        try:
            index = ladder.index_of(pinned)
        except KeyError as exc:
            raise UnknownSet(str(exc.args[0])) from None
        if needed > ladder.sets[index].window:
            raise ContextLengthExceeded(prompt_tokens, max_tokens, ladder.sets[index].window, pinned)
        return index
    if needed > ladder.max_window:
        raise ContextLengthExceeded(prompt_tokens, max_tokens, ladder.max_window)
    start_needs = prompt_tokens + 1 if Policy(policy) is Policy.DYNAMIC else needed
    return next(i for i, fs in enumerate(ladder.sets) if fs.window >= start_needs)


def admit(ladder: Ladder, prompt_tokens: int, max_tokens: int, policy: Policy, pinned: Any = None,
          resumable: bool = True, lead: int = 0) -> Admission:
    """Where a request starts and whether it may be promoted (a Refusal when no set can take it).

    ``resumable`` is False for output that cannot go on in a new engine request (a grammar, as
    structured outputs and forced tool calls use): such a request is admitted by the budget rule,
    whatever the policy. A pinned request never moves. ``lead``: the decode steps the next set's
    prefill needs to run beside the decode (server.side_prefill); a promotable request with less room
    than that in its start set starts in the smallest set with that room instead, so its switch cannot
    stall it (0: the window rule alone).
    """
    policy = Policy(policy) if resumable else Policy.BUDGET
    index = choose_set(ladder, prompt_tokens, max_tokens, policy, pinned)
    promotable = policy is Policy.DYNAMIC and pinned is None
    if promotable and lead and prompt_tokens + max_tokens > ladder.sets[index].window:
        index = next((i for i, fs in enumerate(ladder.sets) if fs.window >= prompt_tokens + lead),
                     len(ladder.sets) - 1)
    fits = prompt_tokens + max_tokens <= ladder.sets[index].window
    return Admission(index, promotable and not fits)


def segment_tokens(ladder: Ladder, index: int, sequence: int, remaining: int) -> int:
    """How many tokens a promotable request may generate in set ``index`` from ``sequence`` tokens on:
    up to that set's window (the last set: all that remain)."""
    if index == len(ladder.sets) - 1:
        return remaining
    return min(remaining, ladder.sets[index].window - sequence)


def next_set(ladder: Ladder, sequence: int, remaining: int) -> int:
    """The set a request that reached its window at ``sequence`` tokens moves to (dynamic, unpinned)."""
    return choose_set(ladder, sequence, remaining, Policy.DYNAMIC)


def engine_set(ladder: Ladder, prompt_tokens: int, max_tokens: int, pinned: Any = None) -> int:
    """The set a request runs in inside the engine (rule 6): the one it names, else the budget rule."""
    return choose_set(ladder, prompt_tokens, max_tokens, Policy.BUDGET, pinned)
