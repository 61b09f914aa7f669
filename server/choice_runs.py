"""What the response headers, the per-choice fields and the metrics say about each choice of a request.

The engine client makes one :class:`ChoiceRun` per choice it admits and adds it to the HTTP request's
record (server.request_records); the middleware reads it there for the ``x-rope-set`` headers and the
``rope_set`` / ``rope_promotions`` fields, and the metrics record each one when it ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vllm.outputs import CompletionOutput


@dataclass
class Promotion:
    from_set: str
    to_set: str
    at_tokens: int  # sequence length (prompt + generated) when it moved
    stall_s: float | None = None  # last token before the switch to the first after it
    cached_tokens: int = 0  # of the continuation's prefill, found in the prefix cache (side prefills put them there)
    side_prefills: int = 0  # side requests that prepared the switch

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.from_set, "to": self.to_set, "at_tokens": self.at_tokens}


@dataclass
class ChoiceRun:
    start_set: str
    prompt_tokens: int
    promotions: list[Promotion] = field(default_factory=list)
    completion_tokens: int = 0
    outcome: str = "aborted"  # until it finishes: stop, length, abort or error
    started: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    token_gaps_s: list[float] = field(default_factory=list)
    queue_s: list[float] = field(default_factory=list)  # one per engine request (segment)
    e2e_s: float | None = None

    @property
    def final_set(self) -> str:
        return self.promotions[-1].to_set if self.promotions else self.start_set

    def saw(self, output: CompletionOutput) -> None:
        self.completion_tokens += len(output.token_ids)

    def segment_done(self, stats: Any, tokens: int) -> None:
        """Timings of one finished engine request, from vLLM's own per-request stats."""
        if stats is None:
            return
        if self.first_token_s is None and stats.first_token_latency:
            self.first_token_s = stats.first_token_latency
        if stats.scheduled_ts and stats.queued_ts:
            self.queue_s.append(max(stats.scheduled_ts - stats.queued_ts, 0.0))
        if tokens > 1 and stats.last_token_ts > stats.first_token_ts > 0:
            self.token_gaps_s.extend([(stats.last_token_ts - stats.first_token_ts) / (tokens - 1)] * (tokens - 1))

    def finish(self, outcome: str | None) -> None:
        """Once: the first outcome stands (an error after a finish changes nothing)."""
        if self.e2e_s is None:
            self.outcome = outcome or "stop"
            self.e2e_s = time.monotonic() - self.started

