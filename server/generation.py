"""One choice's generation across the ladder: start set, promotion, stop strings, deltas.

DESIGN.md rule 3: under ``dynamic`` a request runs in its set with max_tokens capped at the
set's window; when it stops there and the client's budget allows more, prompt + generated
tokens are prefilled again under the next set (a new engine request, so no KV entry is
mixed across sets) and generation goes on. Stop strings are checked here, over the text of
all segments, so a stop string that straddles a switch still stops.
"""

from __future__ import annotations

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
    """Everything a response needs to say about one choice once it is done."""

    start_set: str
    final_set: str = ""
    promotions: list[Promotion] = field(default_factory=list)
    completion_tokens: int = 0


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
    """Yield deltas of one choice; ``run`` is filled in as it goes. Aborts engine work it abandons."""
    index = choose_set(ladder, len(prompt_ids), max_tokens, policy, pinned)
    run.start_set = run.final_set = ladder.sets[index].name
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
                generated.extend(completion.token_ids)
                text, stopped = scanner.feed(completion.text)
                finish = completion.finish_reason
                if stopped:
                    break
                if text or completion.token_ids:
                    yield Delta(text, list(completion.token_ids), list(completion.logprobs or []))
        finally:
            if stopped or finish is None:  # we left the engine request early (stop, disconnect, error)
                await engine.abort(engine_id)
        run.completion_tokens = len(generated)
        if stopped:
            yield Delta(text, [], [], "stop")
            return
        promote = finish == "length" and cap < remaining
        if not promote:
            yield Delta(scanner.flush(), [], [], finish or "stop")
            return
        sequence = len(prompt_ids) + len(generated)
        next_index = choose_set(ladder, sequence, max_tokens - len(generated), Policy.DYNAMIC)
        run.promotions.append(Promotion(current.name, ladder.sets[next_index].name, sequence))
        run.final_set = ladder.sets[next_index].name
        index = next_index
        segment += 1
