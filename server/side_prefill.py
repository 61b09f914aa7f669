"""Promotion without a stall: the next set's prefill runs beside the decode, before the window is reached.

A promoted request is prefilled again under the next set (prompt + what it generated: docs/design.md says
why). Done at the switch, that prefill stops the stream for its whole length (seconds for 8192 tokens of a
small model on a CPU: bench/README.md). Done early, as a *side request* of one token under the next set (same
prompt shape, so the same cache salt), its KV blocks enter vLLM's prefix cache while the decode goes on; at
the switch the continuation finds them and prefills only the tokens generated since. A side prefill that
leaves a long tail (a slow prefill beside a fast decode) is followed by another over the tail, and so on,
while the window is still ahead.

When to start: the *lead* is how many of the request's own decode steps the prefill will take, from running
estimates of the engine's prefill rate (timed on every segment's and side prefill's first output) and the
request's decode rate (server.choices feeds both); one begins when the tokens left before the window fall to
the lead. Side requests are invisible to clients and to the ``longrope_*`` request metrics; they have their
own counter.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from vllm.exceptions import GracefulHTTPError
from vllm.sampling_params import RequestOutputKind, SamplingParams

from rope_ext.protocol import naming_set

# Starting guesses until the first measurement; each measurement moves an estimate half way.
FIRST_PREFILL_TOKENS_PER_S = 1000.0
FIRST_DECODE_S_PER_TOKEN = 0.05
SMOOTHING = 0.5
MARGIN = 1.5  # start this much earlier than the estimate says: finishing late stalls, early costs nothing
SMALLEST_TAIL = 16  # tokens: a tail shorter than a KV block is not worth a side request
SMALLEST_PREFILL_SAMPLE = 128  # tokens: shorter prefills time the engine's overhead more than its rate


def smoothed(estimate: float | None, sample: float) -> float:
    """``estimate`` moved a fraction SMOOTHING toward ``sample`` (``sample`` itself when there is none yet)."""
    return sample if estimate is None else estimate + SMOOTHING * (sample - estimate)


@dataclass
class Rates:
    """Running estimates, shared by every request of the engine client: every choice's runner feeds them
    (server.choices), side prefills' own prefills too."""

    prefill_tokens_per_s: float = FIRST_PREFILL_TOKENS_PER_S
    decode_s_per_token: float = FIRST_DECODE_S_PER_TOKEN

    def prefilled(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.prefill_tokens_per_s = smoothed(self.prefill_tokens_per_s, tokens / seconds)

    def decoded(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.decode_s_per_token = smoothed(self.decode_s_per_token, seconds / tokens)

    def observe_prefill(self, output: Any, prompt_tokens: int) -> None:
        """A request's first output: how fast the engine prefilled the part of its prompt that was not
        cached, from the engine core's own timestamps (scheduled to first token)."""
        stats = output.metrics
        tokens = prompt_tokens - (output.num_cached_tokens or 0)
        if stats is None or not stats.first_token_ts or not stats.scheduled_ts or tokens < SMALLEST_PREFILL_SAMPLE:
            return
        self.prefilled(tokens, stats.first_token_ts - stats.scheduled_ts)


class SidePrefills:
    """The engine client's side-prefill settings, estimates and side requests.

    ``max_lead``: the most tokens before a window a side prefill may start (0: never; a cap on the lead).
    It is off too when the engine has no prefix cache (the side request's blocks would be thrown away).
    """

    def __init__(self, engine: Any, max_lead: int, prefix_caching: bool, metrics: Any):
        self.engine = engine
        self.max_lead = max_lead if prefix_caching else 0
        self.metrics = metrics
        self.rates = Rates()

    @property
    def enabled(self) -> bool:
        return self.max_lead > 0

    def lead(self, prefill_tokens: int, decode_s_per_token: float | None = None) -> int:
        """Decode steps that a prefill of ``prefill_tokens`` takes (with a margin), at most ``max_lead``."""
        if not self.enabled or prefill_tokens <= 0:
            return 0
        step = decode_s_per_token or self.rates.decode_s_per_token
        steps = MARGIN * prefill_tokens / self.rates.prefill_tokens_per_s / step
        return min(self.max_lead, math.ceil(steps))

    def worth_it(self, tail: int, decode_s_per_token: float | None = None) -> bool:
        """Whether prefilling ``tail`` tokens takes longer than a decode step (else a side request costs more
        than the stall it saves)."""
        step = decode_s_per_token or self.rates.decode_s_per_token
        return tail / self.rates.prefill_tokens_per_s > step

    def start(self, prompt: dict, set_name: str, request_id: str, kwargs: dict[str, Any]) -> asyncio.Task | None:
        """Prefill ``prompt`` under ``set_name`` as a one-token side request; the task ends when it is cached.

        ``kwargs``: the request's own engine arguments (its LoRA adapter, priority, data-parallel rank): the
        prefix cache keys blocks by the adapter, and the continuation must land where the blocks are. None,
        and nothing started, when vLLM's admission limits (``--max-num-queued-reqs``, ``--max-num-queued-tokens``)
        have no room for one more engine request: a side prefill counts like any request, and it is optional."""
        try:
            self.engine.check_admission(1, request_id)
        except GracefulHTTPError:
            return None
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY, extra_args=naming_set(None, set_name))
        return asyncio.create_task(self._run(prompt, params, request_id, set_name, kwargs))

    async def _run(self, prompt: dict, params: SamplingParams, request_id: str, set_name: str,
                   kwargs: dict[str, Any]) -> None:
        async with aclosing(self.engine.generate(prompt, params, request_id, **kwargs)) as outputs:
            async for output in outputs:
                self.rates.observe_prefill(output, len(prompt["prompt_token_ids"]))
        self.metrics.side_prefill(set_name)


class Warmer:
    """One promotable choice's side prefills toward the set it will move to next."""

    def __init__(self, side: SidePrefills, request_id: str):
        self.side, self.request_id = side, request_id
        self.task: asyncio.Task | None = None
        self.covered = 0  # sequence length the finished side prefills hold in the next set's cache
        self.pending = 0  # sequence length the side prefill in flight will hold
        self.count = 0  # side prefills toward the coming switch
        self.started = 0  # side prefills of this choice (their request ids)
        self.in_flight = ""  # the request id of the last one started

    @property
    def request_ids(self) -> list[str]:
        """The side request in flight, if any (an abort of the choice must reach it)."""
        return [self.in_flight] if self.task is not None and not self.task.done() else []

    def maybe_start(self, prompt: Callable[[], dict], sequence: int, switch_at: int, next_set: str,
                    kwargs: dict[str, Any], decode_s_per_token: float | None) -> None:
        """Start a side prefill of ``prompt()`` (``sequence`` tokens) under ``next_set`` if the window
        (``switch_at``) is within the lead and no side prefill is in flight. ``decode_s_per_token``: the
        choice's own decode rate, once measured (server.choices)."""
        if self.task is not None:
            if not self.task.done():
                return
            self._collect()
        tail = sequence - self.covered
        left = switch_at - sequence
        if left <= 0 or tail < SMALLEST_TAIL or left > self.side.lead(switch_at - self.covered, decode_s_per_token):
            return
        if self.covered and not self.side.worth_it(tail, decode_s_per_token):
            return  # a tail the switch prefills within about one decode step is cheaper left to it
        self.count += 1
        self.started += 1
        self.pending = sequence
        self.in_flight = f"{self.request_id}-prefill{self.started}"
        self.task = self.side.start(prompt(), next_set, self.in_flight, kwargs)
        if self.task is None:  # no room in vLLM's queue: the switch prefills it, as without side prefills
            self.count -= 1
            self.pending = self.covered

    async def settle(self) -> None:
        """At the switch: let a side prefill in flight finish (its blocks are the continuation's head; one that
        failed leaves the continuation to prefill it all, as without side prefills)."""
        if self.task is not None:
            await asyncio.wait({self.task})
            self._collect()

    def reset(self) -> int:
        """At a switch, once settled: the next side prefills aim at the set after that. Returns how many
        side prefills prepared this switch."""
        count, self.count = self.count, 0
        self.covered = self.pending = 0
        self.task = None
        return count

    async def close(self) -> None:
        """The choice ended (or its client left): stop a side prefill still in flight (a failed one's error
        is read here, so asyncio does not report it as never retrieved)."""
        if self.task is not None:
            if not self.task.done():
                self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def _collect(self) -> None:
        assert self.task is not None
        if not self.task.cancelled() and self.task.exception() is None:
            self.covered = self.pending
        self.task = None
