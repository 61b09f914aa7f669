"""A request that may move up the ladder: each choice runs segment by segment, stitched into one response.

A segment is one engine request, capped at its set's window. When it stops there ('length', with
tokens of the choice's max_tokens left), the choice is promoted: prompt + tokens generated so far
are prefilled again under the next set, as a new engine request (no KV block is ever shared
between sets; why re-prefill: docs/design.md), and generation goes on. Before the window, side
prefills (server.side_prefill) put most of that sequence in the next set's prefix cache, so the
switch does not stall the stream. What vLLM's serving layer receives is one unbroken sequence of
outputs, so its parsers, logprobs and usage work across a switch. With n > 1 every choice runs and
moves on its own (choice i seeded seed + i).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, NamedTuple

from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

from rope_ext.factors import Ladder
from rope_ext.protocol import naming_set
from rope_ext.selection import next_set, segment_tokens
from server.choices import ChoiceRunner, Promotion
from server.side_prefill import SidePrefills, Warmer


class WholeChoiceStops:
    """vLLM's own stop-string rule over a choice's whole text, across its segments: vLLM's incremental
    detokenizer (its ``check_stop_strings``, ``min_tokens`` and ``include_stop_str_in_output`` included),
    fed every token the choice generates.

    vLLM checks stop strings per engine request, so one that straddles a switch would be missed there: a
    promotable choice's segments run without them, and this one detokenizer, built once from the request's
    own prompt and parameters as the engine builds its own, decides. Stop token ids stay with the engine
    (one token cannot straddle a switch).
    """

    def __init__(self, tokenizer: Any, request_id: str, prompt_tokens: list[int], params: SamplingParams):
        from vllm.v1.engine.detokenizer import IncrementalDetokenizer

        # What the detokenizer reads of an EngineCoreRequest (server/vllm_internals.py lists them).
        request = SimpleNamespace(request_id=request_id, sampling_params=params, prompt_token_ids=prompt_tokens,
                                  prompt_embeds=None)
        self.detokenizer = IncrementalDetokenizer.from_new_request(tokenizer, request)

    def feed(self, token_ids: list[int], stop_terminated: bool, finished: bool) -> tuple[str, list[int], str | None]:
        """(text to emit, the tokens kept, the stop string reached or None) for ``token_ids`` just generated.
        ``stop_terminated``: the engine ended on a stop token or EOS; ``finished``: the choice ends here."""
        before = self.detokenizer.num_output_tokens()
        stop = self.detokenizer.update(token_ids, stop_terminated)
        kept = self.detokenizer.output_token_ids[before:]
        return self.detokenizer.get_next_output_text(finished or stop is not None, delta=True), kept, stop


@dataclass
class Segment:
    """One engine request of a choice."""

    set_index: int
    prompt: Any
    params: SamplingParams  # max_tokens: capped at the set's window
    request_id: str
    left: int  # tokens the choice had left to generate when the segment started
    generated_before: int  # tokens the choice had generated before it

    @property
    def capped(self) -> bool:
        """Whether the segment stops at its set's window before the choice's own max_tokens."""
        return self.params.max_tokens < self.left


class Stitched(NamedTuple):
    """One engine output as the choice sees it."""

    output: RequestOutput | None  # what to pass on to the caller, if anything
    promote: bool  # the segment ended at its window with tokens left: the choice goes on in the next set
    stop_string: str | None  # a stop string ended the choice here (the engine request is still running)
    finish_reason: str | None  # the choice's own finish reason (None while it goes on)


class FinalTotal:
    """For a caller that wants only the final output: the choice's whole output so far, across segments."""

    def __init__(self) -> None:
        self.total: CompletionOutput | None = None
        self.cumulative_before = 0.0  # the finished segments' cumulative logprobs
        self.first: RequestOutput | None = None  # its prompt logprobs are the request's

    def add(self, output: RequestOutput, delta: CompletionOutput, segment_ended: bool) -> None:
        """Extend the total by ``delta`` and make ``output`` carry the total."""
        self.first = self.first or output
        running = delta.cumulative_logprob  # vLLM's total so far for this segment (deltas or one final)
        self.total = delta if self.total is None else _extended(self.total, delta)
        if running is not None:
            self.total.cumulative_logprob = self.cumulative_before + running
            if segment_ended:
                self.cumulative_before += running
        output.outputs, output.prompt_logprobs = [self.total], self.first.prompt_logprobs


class PromotingChoice:
    """One choice of a promotable request: :meth:`outputs` runs its segments and stitches their outputs.

    Yields what the caller asked for (``params.output_kind``): deltas, or one final output. Its runner
    (server.choices) owns the choice's state and record and observes every output it yields.
    """

    def __init__(self, engine: Any, ladder: Ladder, prompt: dict, tokens: list[int], params: SamplingParams,
                 request_id: str, kwargs: dict[str, Any], start: int, runner: ChoiceRunner, choice: int,
                 side: SidePrefills | None = None):
        self.engine, self.ladder, self.kwargs = engine, ladder, kwargs
        self.prompt, self.tokens, self.params = prompt, tokens, params
        self.request_id, self.runner, self.choice = request_id, runner, choice
        self.set_index = start
        self.final = FinalTotal() if params.output_kind is RequestOutputKind.FINAL_ONLY else None
        self.stops = WholeChoiceStops(engine.tokenizer, request_id, tokens, params) if params.stop else None
        self.warmer = Warmer(side, request_id) if side is not None and side.enabled else None
        self.generated: list[int] = []
        self.segments = 0
        self.segment_id = request_id  # the engine request running now

    @property
    def engine_request_ids(self) -> list[str]:
        """The engine requests working for this choice now: its segment, a side prefill in flight."""
        return [self.segment_id, *(self.warmer.request_ids if self.warmer is not None else [])]

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                segment = self.plan_segment()
                self.segment_id = segment.request_id
                self.runner.segment_started(len(segment.prompt["prompt_token_ids"]))
                last: Stitched | None = None
                async with aclosing(self.engine.generate(segment.prompt, segment.params, segment.request_id,
                                                         **self.kwargs)) as outputs:
                    async for output in outputs:
                        last = self.stitch(output, segment)
                        if last.output is not None:
                            yield last.output
                        if last.stop_string is not None:
                            break  # leaving the block closes the engine request (aborts it)
                        self.warm_next_set(segment)
                if last is None or not last.promote:
                    self.runner.finish(last and last.finish_reason)
                    return
                side_prefills = 0
                if self.warmer is not None:
                    await self.warmer.settle()
                    side_prefills = self.warmer.reset()
                self.promote_choice(side_prefills)
        except Exception:
            self.runner.finish("error")
            raise
        finally:
            if self.warmer is not None:
                await self.warmer.close()

    def sequence_prompt(self) -> dict:
        """Prompt + generated so far as a token prompt, with the request's own cache salt (vLLM keeps tenants
        apart by it; a side prefill and the continuation it prepares must hash alike)."""
        prompt = {"type": "token", "prompt_token_ids": self.tokens + self.generated}
        if self.prompt.get("cache_salt"):
            prompt["cache_salt"] = self.prompt["cache_salt"]
        return prompt

    def warm_next_set(self, segment: Segment) -> None:
        """Within the lead of a window this segment will reach: a side prefill toward the next set."""
        if self.warmer is None or not segment.capped:
            return
        switch_at = len(self.tokens) + segment.generated_before + segment.params.max_tokens
        generated_then = switch_at - len(self.tokens)
        upcoming = next_set(self.ladder, switch_at, self.params.max_tokens - generated_then)
        self.warmer.maybe_start(self.sequence_prompt, len(self.tokens) + len(self.generated), switch_at,
                                self.ladder.sets[upcoming].name, self.kwargs, self.runner.decode_s_per_token)

    def plan_segment(self) -> Segment:
        """The next engine request: this set, capped at its window; after a switch, prompt + generated."""
        params = self.params.clone()
        left = self.params.max_tokens - len(self.generated)
        params.max_tokens = segment_tokens(self.ladder, self.set_index, len(self.tokens) + len(self.generated), left)
        params.extra_args = naming_set(self.params.extra_args, self.ladder.sets[self.set_index].name)
        if self.stops is not None:  # checked across segments, over the whole choice
            params.stop = []
        if self.stops is not None or self.warmer is not None:  # seen as they come (stitch rebuilds a final)
            params.output_kind = RequestOutputKind.DELTA
        if not self.segments:
            return Segment(self.set_index, self.prompt, params, self.request_id, left, 0)
        params.prompt_logprobs = None  # the first segment reported them
        params.min_tokens = max(self.params.min_tokens - len(self.generated), 0)
        return Segment(self.set_index, self.sequence_prompt(), params, f"{self.request_id}-s{self.segments}", left,
                       len(self.generated))

    def stitch(self, output: RequestOutput, segment: Segment) -> Stitched:
        """One engine output as part of the choice's own sequence.

        A segment that ends at its window with tokens left is promoted: its finish is hidden (the
        choice goes on). A stop string found over the whole choice ends it with finish_reason 'stop'.
        """
        delta = output.outputs[0]
        ended = delta.finish_reason is not None
        promote = ended and delta.finish_reason == "length" and segment.capped
        stop_string = None
        if self.stops is not None:
            delta.text, kept, stop_string = self.stops.feed(list(delta.token_ids), delta.finish_reason == "stop",
                                                            ended and not promote)
            if stop_string is not None:
                delta.token_ids = kept
                delta.finish_reason, delta.stop_reason, promote = "stop", stop_string, False
        self.generated.extend(delta.token_ids)
        self.runner.observe(delta, output)
        delta.index = self.choice
        segment_ended = delta.finish_reason is not None
        if promote:
            delta.finish_reason = delta.stop_reason = None
        finish_reason = delta.finish_reason
        output.request_id, output.prompt_token_ids = self.request_id, self.tokens
        output.finished = finish_reason is not None
        if self.final is not None:
            self.final.add(output, delta, segment_ended)
        passed_on = output.finished or self.final is None and bool(delta.text or delta.token_ids)
        return Stitched(output if passed_on else None, promote, stop_string, finish_reason)

    def promote_choice(self, side_prefills: int) -> None:
        """Move to the next set that holds the sequence so far; the next segment prefills it there."""
        sequence = len(self.tokens) + len(self.generated)
        was = self.ladder.sets[self.set_index].name
        self.set_index = next_set(self.ladder, sequence, self.params.max_tokens - len(self.generated))
        self.runner.switching(Promotion(was, self.ladder.sets[self.set_index].name, sequence,
                                        side_prefills=side_prefills))
        self.segments += 1


def promoting_choices(engine: Any, ladder: Ladder, prompt: dict, tokens: list[int], params: SamplingParams,
                      request_id: str, kwargs: dict[str, Any], start: int, runners: list[ChoiceRunner],
                      side: SidePrefills | None = None) -> list[PromotingChoice]:
    """A promotable request's choices: one engine request each (n = 1 each, choice i seeded seed + i)."""
    if params.n == 1:
        return [PromotingChoice(engine, ladder, prompt, tokens, params, request_id, kwargs, start, runners[0], 0,
                                side)]
    choices = []
    for i in range(params.n):
        one = params.clone()
        one.n = 1
        if one.seed is not None:
            one.seed = params.seed + i  # n choices from one seed must still differ
        choices.append(PromotingChoice(engine, ladder, prompt, tokens, one, f"{request_id}-{i}", kwargs, start,
                                       runners[i], i, side))
    return choices


def fan_out(choices: list[PromotingChoice], request_id: str, final_only: bool) -> AsyncIterator[RequestOutput]:
    """The choices' outputs as they come (streams) or merged into one final output."""
    if len(choices) == 1:
        return choices[0].outputs()
    if final_only:
        return _merged_finals([c.outputs() for c in choices], request_id)
    return _interleaved([c.outputs() for c in choices], request_id)


async def _merged_finals(choices: list[AsyncIterator[RequestOutput]], request_id: str) -> AsyncIterator[RequestOutput]:
    """Every choice's final output as one; a choice that fails cancels the others (they stop generating)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_last(gen)) for gen in choices]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    finals = [task.result() for task in tasks]
    merged = finals[0]
    merged.request_id = request_id
    merged.outputs = [f.outputs[0] for f in finals]
    yield merged


def _extended(total: CompletionOutput, delta: CompletionOutput) -> CompletionOutput:
    """``total`` followed by ``delta``: one output for a caller that wants only the final one."""
    total.text += delta.text
    total.token_ids = [*total.token_ids, *delta.token_ids]
    if total.logprobs is not None and delta.logprobs is not None:
        total.logprobs.extend(delta.logprobs)
    total.finish_reason, total.stop_reason = delta.finish_reason, delta.stop_reason
    return total


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async with aclosing(outputs) as gen:
        async for last in gen:
            pass
    assert last is not None
    return last


async def _interleaved(choices: list[AsyncIterator[RequestOutput]], request_id: str) -> AsyncIterator[RequestOutput]:
    """The choices' outputs as they come, under the request's id. Closing this cancels (and so aborts) them all."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(gen) as outputs:
                async for output in outputs:
                    await queue.put(output)
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            await queue.put(exc)
        finally:
            await queue.put(end)

    tasks = [asyncio.create_task(pump(gen)) for gen in choices]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                item.request_id = request_id
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
