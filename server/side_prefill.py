"""Promotion without a stall: the next set's prefill runs beside the decode, in increments, before the window.

A promoted request is prefilled again under the next set (prompt + what it generated: docs/design.md says
why). Done at the switch, that prefill stops the stream for its whole length (seconds for 8192 tokens of a
small model on a CPU: bench/README.md). Done early, as *side requests* of one token under the next set (same
prompt shape, so the same cache salt), its KV blocks enter vLLM's prefix cache while the decode goes on; at
the switch the continuation finds them and prefills only the tokens generated since.

A side request's prefill shares engine steps with the decode, and a step lasts as long as the prefill it
carries: one side request over the whole sequence moved the stall before the window instead of removing it
(a 6000-token prompt: gaps of seconds against a median of 0.05 s). So the prefill runs in *increments*:
each side request prefills the sequence up to ``covered + increment`` tokens, finds the previous one's blocks
in the prefix cache, and computes only its increment, sized from the measured rates so that a step carrying it
lasts at most about ``1 + PREFILL_SHARE`` decode steps (the user's measure is the longest gap of the stream
over its median: ``GAP_BOUND``). An increment is whole KV blocks (only those are cached), so a block that
costs more than a decode step sets the floor on a slow device. One increment runs at a time in the engine,
so promoting requests side by side do not pile increments into one step.

When to start: the *lead* is how many of the request's own decode steps the increments take
(``TOKENS_PER_INCREMENT`` each, times the requests taking turns, with a margin); one begins when the tokens
left before the window fall to the lead, so a longer prefill or a busier engine starts earlier. Side requests
are invisible to clients and to the ``longrope_*`` request metrics; they have their own counter.
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
GAP_BOUND = 3.0  # the longest gap of a promoting stream, over its median gap, that side prefills aim under
PREFILL_SHARE = (GAP_BOUND - 1) / 2  # decode steps' worth of prefill an increment may add to a step: half the
# room under the bound, the other half for the estimates' error
TOKENS_PER_INCREMENT = 3  # the stream's tokens per increment: the step it runs in, its end seen, the next queued
MARGIN = 1.5  # start this much earlier than the estimate says: finishing late stalls, early costs nothing
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
        cached, from the engine core's own timestamps (scheduled to first token). The steps it ran in carried the
        running requests' decode too, and that time is counted in: the estimate errs low, so increments sized
        from it err small, down to a block (taking the decode step out of a short increment's time leaves noise
        that grows the next increment: bench/README.md, "Promotion")."""
        stats = output.metrics
        tokens = prompt_tokens - (output.num_cached_tokens or 0)
        if stats is None or not stats.first_token_ts or not stats.scheduled_ts or tokens < SMALLEST_PREFILL_SAMPLE:
            return
        self.prefilled(tokens, stats.first_token_ts - stats.scheduled_ts)


class SidePrefills:
    """The engine client's side-prefill settings, estimates and side requests (one in the engine at a time).

    ``max_lead``: the most tokens before a window a side prefill may start (0: never; a cap on the lead).
    It is off too when the engine has no prefix cache (the side requests' blocks would be thrown away).
    ``block_size``: the engine's KV block, in tokens; only whole blocks are cached, so increments are whole
    blocks.
    """

    def __init__(self, engine: Any, max_lead: int, prefix_caching: bool, block_size: int, metrics: Any):
        self.engine = engine
        self.max_lead = max_lead if prefix_caching else 0
        self.block_size = block_size
        self.metrics = metrics
        self.rates = Rates()
        self.warming: set[Warmer] = set()  # the warmers within max_lead of their switch: they take turns

    @property
    def enabled(self) -> bool:
        return self.max_lead > 0

    @property
    def busy(self) -> bool:
        """An increment is in the engine: the others wait for it. Every warmer with a side request in flight
        is in ``warming`` (it joins before it starts one and leaves once its task is collected)."""
        return any(warmer.request_ids for warmer in self.warming)

    def increment(self, decode_s_per_token: float | None = None) -> int:
        """Tokens one side request may prefill: what the engine prefills in PREFILL_SHARE decode steps, in whole
        blocks, at least one."""
        step = decode_s_per_token or self.rates.decode_s_per_token
        blocks = int(PREFILL_SHARE * step * self.rates.prefill_tokens_per_s) // self.block_size
        return max(blocks, 1) * self.block_size

    def lead(self, prefill_tokens: int, decode_s_per_token: float | None = None, turns: int = 1) -> int:
        """Decode steps that increments over ``prefill_tokens`` take (with a margin), when ``turns`` requests
        take turns; at most ``max_lead``."""
        if not self.enabled or prefill_tokens <= 0:
            return 0
        increments = math.ceil(prefill_tokens / self.increment(decode_s_per_token))
        return min(self.max_lead, math.ceil(MARGIN * increments * TOKENS_PER_INCREMENT * turns))

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
    """One promotable choice's side prefills toward the set it will move to next, increment by increment."""

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
        """The next increment of ``prompt()`` (``sequence`` tokens) under ``next_set``, if the window
        (``switch_at``) is within the lead, a whole block is left to add, and no increment is in the engine.
        ``decode_s_per_token``: the choice's own decode rate, once measured (server.choices)."""
        side = self.side
        if self.task is not None:
            if not self.task.done():
                return
            self._collect()
        left = switch_at - sequence
        if left <= 0 or left > side.max_lead:
            return
        side.warming.add(self)  # within the cap of its switch: it takes turns with the others there
        if left > side.lead(switch_at - self.covered, decode_s_per_token, len(side.warming)):
            return
        block = side.block_size
        end = min(self.covered + side.increment(decode_s_per_token), sequence) // block * block
        if end - self.covered < block or side.busy:
            return  # nothing whole to add yet, or another request's increment is in the engine: next output
        whole = prompt()
        self.count += 1
        self.started += 1
        self.pending = end
        self.in_flight = f"{self.request_id}-prefill{self.started}"
        self.task = side.start({**whole, "prompt_token_ids": whole["prompt_token_ids"][:end]}, next_set,
                               self.in_flight, kwargs)
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
        self.side.warming.discard(self)
        return count

    async def close(self) -> None:
        """The choice ended (or its client left): stop a side prefill still in flight (a failed one's error
        is read here, so asyncio does not report it as never retrieved)."""
        self.side.warming.discard(self)
        if self.task is not None:
            if not self.task.done():
                self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def _collect(self) -> None:
        assert self.task is not None
        if not self.task.cancelled() and self.task.exception() is None:
            self.covered = self.pending
        self.task = None
