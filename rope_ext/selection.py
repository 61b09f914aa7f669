"""The regime rule: which factor set a request starts in. The one place this is decided.

Both the server (admission, pinning, promotion) and the engine plugin (requests that reach
plain ``vllm serve`` without a set) call :func:`choose_set`, so they can never disagree.
"""

from __future__ import annotations

from enum import Enum

from rope_ext.factors import Ladder


class Policy(str, Enum):
    """dynamic: start in the smallest set that holds the prompt, promote later; budget: hold it all, never move."""

    DYNAMIC = "dynamic"
    BUDGET = "budget"


class ContextLengthExceeded(ValueError):
    """No set (or not the pinned one) can hold the request; maps to OpenAI's context_length_exceeded."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int, set_name: str | None = None):
        self.prompt_tokens, self.max_tokens, self.limit, self.set_name = prompt_tokens, max_tokens, limit, set_name
        where = f"factor set {set_name!r}" if set_name else "this model"
        super().__init__(
            f"This request needs {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} to generate), more than the context length of {where} ({limit} tokens)."
        )


class UnknownSet(ValueError):
    """A pinned set name that the ladder does not have."""


def choose_set(
    ladder: Ladder,
    prompt_tokens: int,
    max_tokens: int,
    policy: Policy = Policy.BUDGET,
    pinned: str | None = None,
) -> int:
    """Index of the set a request starts in (DESIGN.md rules 2 and 5).

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
