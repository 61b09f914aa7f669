"""One choice's generation across the ladder: start set, promotion, stop strings, deltas.

DESIGN.md rule 3: under ``dynamic`` a request runs in its set with max_tokens capped at the
set's window; when it stops there and the client's budget allows more, prompt + generated
tokens are prefilled again under the next set (a new engine request, so no KV entry is
mixed across sets) and generation goes on. Stop strings are checked here, over the text of
all segments, so a stop string that straddles a switch still stops.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from vllm.sampling_params import RequestOutputKind, SamplingParams

from rope_ext.factors import Ladder
from rope_ext.selection import Policy, choose_set
from rope_ext.vllm_plugin.request_sets import ROPE_SET_KEY


@dataclass
class Promotion:
    from_set: str
    to_set: str
    at_tokens: int  # sequence length (prompt + generated) when it moved

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.from_set, "to": self.to_set, "at_tokens": self.at_tokens}


@dataclass
class Delta:
    """New text for the client; ``finish_reason`` is set on the last one."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Any]] = field(default_factory=list)
    finish_reason: str | None = None


class StopScanner:
    """Finds stop strings in streamed text and holds back a tail that could start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        buffer = self.pending + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i != -1]
        if hits:
            self.pending = ""
            return buffer[: min(hits)], True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buffer)), 0, -1):
                if buffer.endswith(stop[:k]):
                    keep = max(keep, k)
                    break
        self.pending = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


@dataclass
class ChoiceRun:
    """Everything the response and the metrics need to say about one choice once it is done."""

    start_set: str = ""
    final_set: str = ""
    promotions: list[Promotion] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    outcome: str = "aborted"  # until it finishes: stop, length, or error
    started: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    token_gaps_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    queue_s: list[float] = field(default_factory=list)  # one per engine request (segment)
    _last: float = field(default=0.0, repr=False)

    def saw_tokens(self, count: int) -> None:
        now = time.monotonic()
        if self.first_token_s is None:
            self.first_token_s = now - self.started
            count -= 1
        elif count:
            self.token_gaps_s.extend([(now - self._last) / count] * count)
        self._last = now

    def saw_output(self, output: Any) -> None:
        stats = getattr(output, "metrics", None)
        if stats is not None and stats.scheduled_ts and stats.queued_ts and len(self.queue_s) < len(self.promotions) + 1:
            self.queue_s.append(max(stats.scheduled_ts - stats.queued_ts, 0.0))

    def finish(self, outcome: str) -> None:
        self.outcome = outcome
        self.e2e_s = time.monotonic() - self.started


async def generate_choice(
    engine: Any,
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    max_tokens: int,
    ladder: Ladder,
    policy: Policy,
    pinned: str | None,
    stops: list[str],
    run: ChoiceRun,
) -> AsyncIterator[Delta]:
    """Yield deltas of one choice; ``run`` is filled in as it goes. Aborts engine work it abandons.

    Each loop turn is one engine request (a segment) under one set; a promotion starts the
    next segment under the next set with prompt + generated tokens as its prompt.
    """
    try:
        index = choose_set(ladder, len(prompt_ids), max_tokens, policy, pinned)
        run.start_set = run.final_set = ladder.sets[index].name
        run.prompt_tokens = len(prompt_ids)
        scanner = StopScanner(stops)
        generated: list[int] = []
        segment = 0
        while True:
            current = ladder.sets[index]
            remaining = max_tokens - len(generated)
            sequence = len(prompt_ids) + len(generated)
            can_promote = policy is Policy.DYNAMIC and pinned is None and index < len(ladder.sets) - 1
            cap = min(remaining, current.window - sequence) if can_promote else remaining
            segment_params = params.clone()
            segment_params.max_tokens = cap
            segment_params.stop = []  # checked here, across segments
            segment_params.output_kind = RequestOutputKind.DELTA
            segment_params.extra_args = {**(params.extra_args or {}), ROPE_SET_KEY: current.name}
            engine_id = f"{request_id}-s{segment}"
            finish: str | None = None
            stopped = False
            try:
                async for output in engine.generate(
                    {"prompt_token_ids": prompt_ids + generated}, segment_params, engine_id
                ):
                    completion = output.outputs[0]
                    run.saw_output(output)
                    generated.extend(completion.token_ids)
                    run.completion_tokens = len(generated)
                    if completion.token_ids:
                        run.saw_tokens(len(completion.token_ids))
                    text, stopped = scanner.feed(completion.text)
                    finish = completion.finish_reason
                    if stopped:
                        break
                    if text or completion.token_ids:
                        yield Delta(text, list(completion.token_ids), list(completion.logprobs or []))
            finally:
                if stopped or finish is None:  # we left the engine request early (stop, disconnect, error)
                    await engine.abort(engine_id)
            if stopped:
                run.finish("stop")
                yield Delta(text, [], [], "stop")
                return
            promote = finish == "length" and cap < remaining
            if not promote:
                run.finish(finish or "stop")
                yield Delta(scanner.flush(), [], [], finish or "stop")
                return
            sequence = len(prompt_ids) + len(generated)
            next_index = choose_set(ladder, sequence, max_tokens - len(generated), Policy.DYNAMIC)
            run.promotions.append(Promotion(current.name, ladder.sets[next_index].name, sequence))
            run.final_set = ladder.sets[next_index].name
            index = next_index
            segment += 1
    except Exception:
        run.finish("error")
        raise
