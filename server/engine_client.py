"""Our engine client: vLLM's async engine with DESIGN.md's regimes (rules 2, 3 and 5).

vLLM's OpenAI app (chat, completions, responses, tools, structured outputs, ...) only ever
calls ``engine_client.generate(prompt, sampling_params, request_id)``; wrapping that one call
is how the regimes reach every endpoint without touching vLLM's routes. Everything else is
delegated to the wrapped ``AsyncLLM``.

- **Admission** runs when ``generate`` is called, before any response has started, so a refusal
  (unknown set, a pinned set too small) is an HTTP 400, never an in-band stream error.
- **Promotion** (policy ``dynamic``): the request runs capped at its set's window; when it
  stops there with budget left, prompt + generated tokens are prefilled again under the next
  set (a new engine request: no KV entry is mixed across sets) and generation goes on. What
  the serving layer receives is one sequence of outputs, so its parsers, logprobs and usage
  work across a switch. With n > 1 each choice runs and moves on its own (seed + i).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from vllm.exceptions import GracefulHTTPError, VLLMValidationError
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.exceptions import EngineDeadError

from rope_ext.factors import Ladder
from rope_ext.selection import ContextLengthExceeded, Policy, UnknownSet, choose_set
from rope_ext.vllm_plugin.request_sets import ROPE_SET_KEY
from server.metrics import ServerMetrics


@dataclass
class Promotion:
    from_set: str
    to_set: str
    at_tokens: int  # sequence length (prompt + generated) when it moved

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.from_set, "to": self.to_set, "at_tokens": self.at_tokens}


@dataclass
class ChoiceRun:
    """What the response headers, the per-choice fields and the metrics say about one choice."""

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
        self.outcome = outcome or "stop"
        self.e2e_s = time.monotonic() - self.started


# The choices of the HTTP request being served (set per request by server.middleware): the
# engine client appends each choice it admits, in choice order, and the middleware reads them
# for the x-rope-set headers and the per-choice rope_set / rope_promotions fields.
current_choices: ContextVar[list[ChoiceRun] | None] = ContextVar("longrope_choices", default=None)


class StopScanner:
    """Finds stop strings in text that arrives in pieces, holding back a tail that could start one.

    Used only for requests that may be promoted: vLLM checks stop strings per engine request,
    so one that straddles a switch would be missed there.
    """

    def __init__(self, stops: list[str], include: bool):
        self.stops = [s for s in stops if s]
        self.include = include
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text safe to emit, the stop string reached or None)."""
        buffer = self.pending + text
        hits = sorted((i, s) for s in self.stops if (i := buffer.find(s)) != -1)
        if hits:
            at, stop = hits[0]
            self.pending = ""
            return buffer[: at + (len(stop) if self.include else 0)], stop
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buffer)), 0, -1)
                    if buffer.endswith(s[:k])), default=0)
        self.pending = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep], None

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def _token_prompt(prompt: Any) -> list[int] | None:
    """The prompt's token ids when it is a plain token input (what vLLM's serving layer sends)."""
    if isinstance(prompt, dict) and prompt.get("type", "token") == "token" and "prompt_token_ids" in prompt:
        return prompt["prompt_token_ids"]  # read only: later segments build new lists
    return None


class LadderEngineClient:
    """Delegates to vLLM's ``AsyncLLM``; ``generate`` applies the ladder's regimes, ``shutdown`` drains."""

    def __init__(self, engine: Any, ladder: Ladder, policy: Policy, metrics: ServerMetrics):
        self.engine = engine
        self.ladder = ladder
        self.policy = Policy(policy)
        self.metrics = metrics
        self.running = 0  # requests being generated (each counted once, whatever its choices and segments)
        self.draining = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    # ---- SIGTERM drain ----

    def shutdown(self, timeout: float | None = None) -> None:
        """On SIGTERM (vLLM's launcher calls this off the event loop, with ``--shutdown-timeout``):
        refuse new requests, let running ones finish for up to ``timeout`` seconds, then stop the engine.

        vLLM 0.32's own drain stops the engine core at once here (running streams end in an
        EngineDeadError), and a promoted request would need a new engine request mid-drain.
        """
        self.draining = True
        deadline = time.monotonic() + (timeout or 0)
        while self.running and time.monotonic() < deadline:
            time.sleep(0.1)
        self.engine.shutdown(timeout=timeout)

    def check_admission(self, n: int = 1, request_id: str | None = None) -> None:
        if self.draining:
            raise GracefulHTTPError("The server is shutting down; send the request to another instance.",
                                    HTTPStatus.SERVICE_UNAVAILABLE)
        self.engine.check_admission(n, request_id)

    async def check_health(self) -> None:
        if self.draining:  # /health says 503, so load balancers stop sending
            raise EngineDeadError()
        await self.engine.check_health()

    def death_reason(self) -> str | None:
        """Why the engine stopped on its own (killed, crashed, a fatal engine error); None after a drain.

        vLLM's watchdog stops the HTTP server when the engine dies and its launcher then returns as
        after a clean stop; `longrope serve` asks this to exit non-zero instead, so an orchestrator restarts it.
        """
        if self.draining or not self.engine.errored:
            return None
        manager = self.engine.engine_core.resources.engine_manager
        exits = manager.finished_procs() if manager is not None else {}
        ended = "; ".join(f"process {name} {_exit_text(code)}" for name, code in sorted(exits.items()))
        return f"{ended or 'the engine core reported a fatal error'} (vLLM's log above says what it saw)"

    # ---- admission (DESIGN.md rules 2 and 5), decided once per request ----

    def _admit(self, prompt_tokens: int, params: SamplingParams) -> tuple[int, bool]:
        """(start set index, whether the request may be promoted); a refusal is vLLM's 400 error."""
        pinned = (params.extra_args or {}).get(ROPE_SET_KEY)
        # A grammar cannot resume inside a new engine request: constrained output is admitted whole.
        constrained = params.structured_outputs is not None
        stitchable = params.output_kind in (RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY)
        policy = self.policy if stitchable and not constrained else Policy.BUDGET
        try:
            index = choose_set(self.ladder, prompt_tokens, params.max_tokens, policy, pinned)
        except UnknownSet as exc:
            raise VLLMValidationError(str(exc), parameter="rope_set") from None
        except ContextLengthExceeded as exc:  # counted by the middleware, with vLLM's own refusals
            raise VLLMValidationError(str(exc), parameter="rope_set" if pinned else "max_tokens") from None
        fits = prompt_tokens + params.max_tokens <= self.ladder.sets[index].window
        return index, policy is Policy.DYNAMIC and pinned is None and not fits

    def generate(self, prompt: Any, sampling_params: SamplingParams, request_id: str,
                 **kwargs: Any) -> AsyncIterator[RequestOutput]:
        """vLLM's ``EngineClient.generate``: admits now (refusals raise here), generates when iterated."""
        tokens = _token_prompt(prompt)
        if tokens is None:  # embeddings, streaming input, a ready EngineCoreRequest: the plugin's budget rule
            return self.engine.generate(prompt, sampling_params, request_id, **kwargs)
        index, promotable = self._admit(len(tokens), sampling_params)
        name = self.ladder.sets[index].name
        runs = [ChoiceRun(name, len(tokens)) for _ in range(sampling_params.n)]
        choices = current_choices.get()
        if choices is not None:
            choices.extend(runs)
        if promotable:
            return self._promoting(prompt, tokens, sampling_params, request_id, kwargs, index, runs)
        sampling_params.extra_args = {**(sampling_params.extra_args or {}), ROPE_SET_KEY: name}
        return self._whole(prompt, sampling_params, request_id, kwargs, runs)

    # ---- a request that stays in its set: vLLM's own request, observed ----

    async def _whole(self, prompt: Any, params: SamplingParams, request_id: str, kwargs: dict[str, Any],
                     runs: list[ChoiceRun]) -> AsyncIterator[RequestOutput]:
        self.running += 1
        try:
            async with aclosing(self.engine.generate(prompt, params, request_id, **kwargs)) as outputs:
                async for output in outputs:
                    for completion in output.outputs:
                        run = runs[completion.index]
                        run.saw(completion)
                        if completion.finish_reason is not None:
                            run.segment_done(output.metrics, run.completion_tokens)
                            run.finish(completion.finish_reason)
                    yield output
        except Exception:
            for run in runs:
                if run.e2e_s is None:
                    run.finish("error")
            raise
        finally:
            self.running -= 1
            for run in runs:
                self.metrics.choice_done(run)

    # ---- a request that may move up the ladder ----

    async def _promoting(self, prompt: dict, tokens: list[int], params: SamplingParams, request_id: str,
                         kwargs: dict[str, Any], start: int, runs: list[ChoiceRun]) -> AsyncIterator[RequestOutput]:
        self.running += 1
        try:
            async with aclosing(self._choices(prompt, tokens, params, request_id, kwargs, start, runs)) as outputs:
                async for output in outputs:
                    yield output
        finally:
            self.running -= 1

    async def _choices(self, prompt: dict, tokens: list[int], params: SamplingParams, request_id: str,
                       kwargs: dict[str, Any], start: int, runs: list[ChoiceRun]) -> AsyncIterator[RequestOutput]:
        if params.n == 1:
            async with aclosing(self._choice(prompt, tokens, params, request_id, kwargs, start, runs[0], 0)) as gen:
                async for output in gen:
                    yield output
            return
        choices = []
        for i in range(params.n):
            one = params.clone()
            one.n = 1
            if one.seed is not None:
                one.seed = params.seed + i  # n choices from one seed must still differ
            choices.append(self._choice(prompt, tokens, one, f"{request_id}-{i}", kwargs, start, runs[i], i))
        if params.output_kind is RequestOutputKind.FINAL_ONLY:
            finals = await asyncio.gather(*(_last(gen) for gen in choices))
            merged = finals[0]
            merged.request_id = request_id
            merged.outputs = [f.outputs[0] for f in finals]
            yield merged
            return
        async for output in _interleave(choices):
            output.request_id = request_id
            yield output

    async def _choice(self, prompt: dict, tokens: list[int], params: SamplingParams, request_id: str,
                      kwargs: dict[str, Any], index: int, run: ChoiceRun, choice: int) -> AsyncIterator[RequestOutput]:
        """One choice, segment by segment; yields deltas (stream) or one final output, as ``params`` asks."""
        final_only = params.output_kind is RequestOutputKind.FINAL_ONLY
        scanner = StopScanner(params.stop, params.include_stop_str_in_output) if params.stop else None
        generated: list[int] = []
        total: CompletionOutput | None = None  # what a final-only caller gets at the end
        first: RequestOutput | None = None
        segment = 0
        try:
            while True:
                current = self.ladder.sets[index]
                remaining = params.max_tokens - len(generated)
                cap = remaining if index == len(self.ladder.sets) - 1 else \
                    min(remaining, current.window - len(tokens) - len(generated))
                seg = params.clone()
                seg.max_tokens = cap
                seg.extra_args = {**(params.extra_args or {}), ROPE_SET_KEY: current.name}
                if scanner is not None:  # checked here, across segments
                    seg.stop, seg.output_kind = [], RequestOutputKind.DELTA
                if segment:
                    seg.prompt_logprobs = None
                    seg.min_tokens = max(params.min_tokens - len(generated), 0)
                    seg_prompt = {"type": "token", "prompt_token_ids": tokens + generated}
                else:
                    seg_prompt = prompt
                engine_id = request_id if segment == 0 else f"{request_id}-s{segment}"
                promote, stop_hit, before = False, None, len(generated)
                async with aclosing(self.engine.generate(seg_prompt, seg, engine_id, **kwargs)) as outputs:
                    async for output in outputs:
                        delta = output.outputs[0]
                        first = first or output
                        generated.extend(delta.token_ids)
                        run.saw(delta)
                        delta.index = choice
                        if scanner is not None:
                            delta.text, stop_hit = scanner.feed(delta.text)
                            if stop_hit is not None:
                                delta.finish_reason, delta.stop_reason = "stop", stop_hit
                        if delta.finish_reason is not None and stop_hit is None:
                            promote = delta.finish_reason == "length" and cap < remaining
                            if scanner is not None and not promote:
                                delta.text += scanner.flush()
                        if delta.finish_reason is not None or stop_hit is not None:
                            run.segment_done(output.metrics, len(generated) - before)
                        if promote:
                            delta.finish_reason = delta.stop_reason = None
                        output.request_id, output.prompt_token_ids = request_id, tokens
                        output.finished = delta.finish_reason is not None
                        if final_only:
                            total = delta if total is None else _extended(total, delta)
                            output.outputs, output.prompt_logprobs = [total], first.prompt_logprobs
                        if output.finished or not final_only and (delta.text or delta.token_ids):
                            yield output
                        if stop_hit is not None:
                            break  # leaving the loop closes the engine request (aborts it)
                if not promote:
                    run.finish(stop_hit and "stop" or (total or delta).finish_reason)
                    return
                sequence = len(tokens) + len(generated)
                index = choose_set(self.ladder, sequence, params.max_tokens - len(generated), Policy.DYNAMIC)
                run.promotions.append(Promotion(current.name, self.ladder.sets[index].name, sequence))
                segment += 1
        except Exception:
            run.finish("error")
            raise
        finally:
            self.metrics.choice_done(run)


def _exit_text(code: int) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL`` (multiprocessing's negative exit codes)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _extended(total: CompletionOutput, delta: CompletionOutput) -> CompletionOutput:
    """``total`` followed by ``delta``: one output for a caller that wants only the final one."""
    total.text += delta.text
    total.token_ids = [*total.token_ids, *delta.token_ids]
    if total.logprobs is not None and delta.logprobs is not None:
        total.logprobs.extend(delta.logprobs)
    if total.cumulative_logprob is not None and delta.cumulative_logprob is not None:
        total.cumulative_logprob += delta.cumulative_logprob
    total.finish_reason, total.stop_reason = delta.finish_reason, delta.stop_reason
    return total


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async with aclosing(outputs) as gen:
        async for last in gen:
            pass
    assert last is not None
    return last


async def _interleave(choices: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[RequestOutput]:
    """The choices' outputs as they come. Closing this cancels (and so aborts) them all."""
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
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
