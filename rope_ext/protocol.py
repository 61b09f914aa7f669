"""What crosses between the API side and the engine about a request's factor set: two keys and the refusals.

- ``ROPE_SET_KEY``: a request names its set in ``SamplingParams.extra_args`` (``vllm_xargs`` over
  HTTP; `longrope serve` also takes it as a top-level field). Our engine client writes the set it
  chose there too: it is a client of the engine like any other.
- ``SET_INDEX_KEY``: the set's position in the ladder, written once per request by the plugin's
  input processor (the one gate into the engine, which checks the name) and read by the workers.
- A :class:`Refusal` carries its OpenAI ``code`` and ``param`` from where it is raised;
  :func:`vllm_error` is the one place it becomes vLLM's 400 (which keeps the ``param``; a front end
  that answers with the string code, as `longrope serve` does, keeps the refusal itself).
"""

from __future__ import annotations

from typing import Any

ROPE_SET_KEY = "rope_set"
SET_INDEX_KEY = "_rope_set_index"


class Refusal(ValueError):
    """A request no set can take; a 400 with OpenAI's ``code`` and the ``param`` to change."""

    code = "invalid_request"

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(Refusal):
    """No set (or not the pinned one) can hold prompt + max_tokens."""

    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int, set_name: str | None = None):
        self.limit = limit
        where = f"factor set {set_name!r}" if set_name else "this model"
        super().__init__(
            f"This request needs {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} to generate), more than the context length of {where} ({limit} tokens).",
            param=ROPE_SET_KEY if set_name else "max_tokens",
        )


class UnknownSet(Refusal):
    """A pinned set name that the ladder does not have."""

    code = "unknown_rope_set"

    def __init__(self, message: str):
        super().__init__(message, param=ROPE_SET_KEY)


def vllm_error(refusal: Refusal) -> Exception:
    """``refusal`` as vLLM's validation error (HTTP 400, ``param`` kept)."""
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(str(refusal), parameter=refusal.param)


def pinned_set(extra_args: dict[str, Any] | None) -> Any:
    """The set a request names (any JSON value: the selection rule says what is wrong with a bad one)."""
    return (extra_args or {}).get(ROPE_SET_KEY)


def naming_set(extra_args: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """``extra_args`` with the request's set named ``name``."""
    return {**(extra_args or {}), ROPE_SET_KEY: name}
