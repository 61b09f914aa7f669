"""One choice of a request, from admission to its outcome: its record, and the runner that owns its life.

A choice is one entry of a response's ``choices``. The engine client makes a ChoiceRunner for each choice
it admits. Whichever path the choice takes, vLLM's own engine request passed through (one segment) or one
engine request per set (server.promotion), every output the client receives goes through :meth:`observe`:
the one place that feeds the choice's record (what the headers, per-choice fields and counters say), the
latency metrics as the client sees them (time to first token, each gap between deliveries, the queue) and
the rate estimates the side prefills are timed by. :meth:`finish` ends it once, with its outcome.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from vllm.outputs import CompletionOutput, RequestOutput


class ChoiceState(enum.Enum):
    ADMITTED = "admitted"  # no segment started yet
    RUNNING = "running"  # a segment is generating
    SWITCHING = "switching"  # a segment reached its set's window; the next set's segment is being prepared
    FINISHED = "finished"  # its outcome is known and recorded


@dataclass
class Promotion:
    from_set: str
    to_set: str
    at_tokens: int  # sequence length (prompt + generated) when it moved
    stall_s: float | None = None  # the gap between the last delivery before the switch and the first after it
    cached_tokens: int = 0  # of the continuation's prefill, found in the prefix cache (side prefills put them there)
    side_prefills: int = 0  # side requests that prepared the switch

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.from_set, "to": self.to_set, "at_tokens": self.at_tokens}


@dataclass
class ChoiceRun:
    """What the headers, the per-choice fields and the counters say about one choice."""

    start_set: str
    prompt_tokens: int
    promotions: list[Promotion] = field(default_factory=list)
    completion_tokens: int = 0
    outcome: str = "aborted"  # until it finishes: stop, length, aborted or error

    @property
    def final_set(self) -> str:
        return self.promotions[-1].to_set if self.promotions else self.start_set


class ChoiceRunner:
    """One choice's life: its state, its record, and the one observation hook.

    ``metrics``: server.metrics.ServerMetrics, None for an engine request that is no client's choice (a
    beam search's steps); ``rates``: server.side_prefill.Rates, shared by the engine client's requests.
    """

    def __init__(self, run: ChoiceRun, metrics: Any, rates: Any = None):
        self.run, self.metrics, self.rates = run, metrics, rates
        self.state = ChoiceState.ADMITTED
        self.admitted_at = time.monotonic()
        self.last_delivery: float | None = None
        self.decode_s_per_token: float | None = None  # this choice's own decode rate, once measured
        self._segment_prompt = 0  # tokens of the current segment's prompt, until its first output is seen

    def segment_started(self, prompt_tokens: int) -> None:
        """A segment (engine request) of ``prompt_tokens`` starts; 0 when another choice's runner times the
        engine request they share (n choices of one pass-through request)."""
        self.state = ChoiceState.RUNNING
        self._segment_prompt = prompt_tokens

    def switching(self, promotion: Promotion) -> None:
        """Its segment reached a window: the choice moves to ``promotion.to_set`` (the next segment starts)."""
        self.state = ChoiceState.SWITCHING
        self.run.promotions.append(promotion)

    def observe(self, completion: CompletionOutput, output: RequestOutput) -> None:
        """The hook: an output of this choice, as the client receives it now."""
        now = time.monotonic()
        if self._segment_prompt:
            self._segment_seen(output)
        tokens = len(completion.token_ids)
        if not tokens:
            return
        self.run.completion_tokens += tokens
        if self.last_delivery is None:
            self._measured("ttft", self.run.start_set, now - self.admitted_at)
        else:
            gap = now - self.last_delivery
            self._measured("itl", self.run.final_set, gap)
            promotion = self.run.promotions[-1] if self.run.promotions else None
            if promotion is not None and promotion.stall_s is None:
                promotion.stall_s = gap  # the first delivery after a switch: its gap is the stall
            else:
                self._decoded(tokens, gap)
        self.last_delivery = now

    def _segment_seen(self, output: RequestOutput) -> None:
        """A segment's first output: its queue time, its prefill's rate, what the prefix cache held."""
        stats = output.metrics
        if stats is not None and stats.scheduled_ts and stats.queued_ts:
            self._measured("queue", self.run.final_set, max(stats.scheduled_ts - stats.queued_ts, 0.0))
        if self.rates is not None:
            self.rates.observe_prefill(output, self._segment_prompt)
        if self.run.promotions:
            self.run.promotions[-1].cached_tokens = output.num_cached_tokens or 0
        self._segment_prompt = 0

    def _measured(self, histogram: str, set_name: str, seconds: float) -> None:
        if self.metrics is not None:
            getattr(self.metrics, histogram).labels(self.metrics.model, set_name).observe(seconds)

    def _decoded(self, tokens: int, gap: float) -> None:
        from server.side_prefill import smoothed

        self.decode_s_per_token = smoothed(self.decode_s_per_token, gap / tokens)
        if self.rates is not None:
            self.rates.decoded(tokens, gap)

    def finish(self, outcome: str | None) -> None:
        """Once: the first outcome stands (an error after a finish changes nothing)."""
        if self.state is ChoiceState.FINISHED:
            return
        self.state = ChoiceState.FINISHED
        self.run.outcome = outcome or "stop"
        if self.metrics is not None:
            self.metrics.choice_done(self.run, time.monotonic() - self.admitted_at)
