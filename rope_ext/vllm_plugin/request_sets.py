"""API side of the plugin: every engine request leaves the input processor knowing its set.

The set's name goes into ``sampling_params.extra_args["rope_set"]`` (what the workers read)
and into the request's ``cache_salt`` (so no prefix-cache block is shared between sets).
A client, or our server, names a set with that same key (``vllm_xargs`` over HTTP);
otherwise the shared selection rule picks one by prompt + max_tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from vllm.exceptions import VLLMValidationError

from rope_ext.factors import Ladder
from rope_ext.selection import ContextLengthExceeded, Policy, UnknownSet, choose_set

ROPE_SET_KEY = "rope_set"


def set_for_request(ladder: Ladder, prompt_tokens: int, max_tokens: int, extra_args: dict[str, Any] | None) -> int:
    """The set a request runs in inside the engine: the one it names, else the budget rule (DESIGN.md rule 6)."""
    pinned = (extra_args or {}).get(ROPE_SET_KEY)
    return choose_set(ladder, prompt_tokens, max_tokens, Policy.BUDGET, pinned=pinned)


def salt_for(set_name: str, client_salt: str | None) -> str:
    return f"rope-set:{set_name}" + (f"|{client_salt}" if client_salt else "")


def with_sets(process_inputs: Callable[..., Any], ladder_of: Callable[[Any], Ladder | None]) -> Callable[..., Any]:
    """Wrap ``InputProcessor.process_inputs`` so each EngineCoreRequest it makes carries its set.

    Raises vLLM's validation error (HTTP 400) for an unknown set name or a request no set can hold.
    """

    @functools.wraps(process_inputs)
    def process_inputs_with_set(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = process_inputs(self, *args, **kwargs)
        ladder = ladder_of(self)
        params = request.sampling_params
        if ladder is None or params is None:
            return request
        prompt_tokens = len(request.prompt_token_ids) if request.prompt_token_ids is not None else 0
        try:
            index = set_for_request(ladder, prompt_tokens, params.max_tokens, params.extra_args)
        except UnknownSet as exc:
            raise VLLMValidationError(str(exc), parameter=f"vllm_xargs.{ROPE_SET_KEY}") from None
        except ContextLengthExceeded as exc:
            raise VLLMValidationError(str(exc), parameter="max_tokens") from None
        name = ladder.sets[index].name
        params.extra_args = {**(params.extra_args or {}), ROPE_SET_KEY: name}
        request.cache_salt = salt_for(name, request.cache_salt)
        return request

    process_inputs_with_set.__longrope__ = True  # type: ignore[attr-defined]
    return process_inputs_with_set
