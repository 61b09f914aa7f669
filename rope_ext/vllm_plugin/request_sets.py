"""API side of the plugin: every engine request leaves vLLM's input processor knowing its set.

This is the one gate into the engine, whoever the client is (our engine client, plain `vllm
serve`, ``LLM.generate``), so the set's index is resolved here, once per request: from the name
the request gives (``rope_set`` in its extra_args), else by the budget rule. The index goes into
``extra_args`` for the workers, the name into the request's ``cache_salt`` (so no prefix-cache
block is shared between sets).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from rope_ext.factors import Ladder
from rope_ext.protocol import SET_INDEX_KEY, Refusal, naming_set, pinned_set, vllm_error
from rope_ext.selection import engine_set


def salt_for(set_name: str, client_salt: str | None) -> str:
    """The request's prefix-cache salt: its set first, then the client's own salt (kept apart too)."""
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
            index = engine_set(ladder, prompt_tokens, params.max_tokens, pinned_set(params.extra_args))
        except Refusal as refusal:
            raise vllm_error(refusal) from None
        name = ladder.sets[index].name
        params.extra_args = {**naming_set(params.extra_args, name), SET_INDEX_KEY: index}
        request.cache_salt = salt_for(name, request.cache_salt)
        return request

    process_inputs_with_set.__longrope__ = True  # type: ignore[attr-defined]
    return process_inputs_with_set
