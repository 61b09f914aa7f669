"""Our engine client: vLLM's async engine with the regimes (docs/design.md, rules 2, 3 and 5).

vLLM's OpenAI app (chat, completions, responses, tools, structured outputs, ...) only ever
calls ``engine_client.generate(prompt, sampling_params, request_id)``; wrapping that one call
is how the regimes reach every endpoint without touching vLLM's routes. Everything else is
delegated to the wrapped ``AsyncLLM``.

- **Admission** (``rope_ext.selection.admit``) runs when ``generate`` is called, before any
  response has started, so a refusal (unknown set, a pinned set too small) is an HTTP 400, never
  an in-band stream error. What it admits (a ChoiceRun per choice) or refuses goes in the HTTP
  request's record (``server.request_records``), for the middleware.
- Each choice is owned by its runner (``server.choices``). A request that fits its start set runs as
  vLLM's own request, its outputs observed; one that may be promoted runs choice by choice, segment
  by segment (``server.promotion``), its next set prefilled beside the decode before the window
  (``server.side_prefill``).
- **Lifecycle**: SIGTERM drains every admitted request (``shutdown``); an abort by request id reaches
  every engine request a choice runs (``abort``); an engine that dies is reported (``death_reason``)
  so that `longrope serve` exits non-zero.
"""

from __future__ import annotations

import signal
import time
import weakref
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from http import HTTPStatus
from typing import Any

from vllm.exceptions import GracefulHTTPError
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.exceptions import EngineDeadError

from rope_ext.factors import Ladder
from rope_ext.protocol import Refusal, naming_set, pinned_set, vllm_error
from rope_ext.selection import Policy, admit
from server.choices import ChoiceRun, ChoiceRunner
from server.metrics import ServerMetrics
from server.promotion import PromotingChoice, fan_out, promoting_choices
from server.request_records import HTTP_REQUEST_KEY, RequestRecords
from server.side_prefill import SidePrefills


def _token_prompt(prompt: Any) -> list[int] | None:
    """The prompt's token ids when it is a plain token input (what vLLM's serving layer sends)."""
    if isinstance(prompt, dict) and prompt.get("type", "token") == "token" and "prompt_token_ids" in prompt:
        return prompt["prompt_token_ids"]  # read only: later segments build new lists
    return None


class LadderEngineClient:
    """Delegates to vLLM's ``AsyncLLM``; ``generate`` applies the ladder's regimes, ``shutdown`` drains."""

    def __init__(self, engine: Any, ladder: Ladder, policy: Policy, metrics: ServerMetrics,
                 side_prefill_max_lead: int = 0, start_by_lead: bool = True):
        """``side_prefill_max_lead``: the most tokens before a window that a side prefill may start (0: none);
        ``start_by_lead``: a promotable request with less room than the lead starts in the next set."""
        self.engine = engine
        self.ladder = ladder
        self.policy = Policy(policy)
        self.metrics = metrics
        cache = engine.vllm_config.cache_config
        self.side = SidePrefills(engine, side_prefill_max_lead, cache.enable_prefix_caching, cache.block_size, metrics)
        self.start_by_lead = start_by_lead
        self.records = RequestRecords()  # what the middleware reports of each HTTP request
        self.running = 0  # requests admitted and not yet ended (each counted once, whatever its choices)
        self.promoting: dict[str, list[PromotingChoice]] = {}  # by request id: its choices' engine requests
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

    async def abort(self, request_id: str | Iterable[str], *args: Any, **kwargs: Any) -> None:
        """vLLM's abort by request id, reaching every engine request of a promotable request too: each choice's
        segment (``-s1``, ``-s2``…, choices ``-0``, ``-1``…) and a side prefill in flight."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        every = [engine_id for rid in ids
                 for engine_id in ([rid] + [e for c in self.promoting.get(rid, []) for e in c.engine_request_ids])]
        await self.engine.abort(list(dict.fromkeys(every)), *args, **kwargs)

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

    # ---- admission, decided once per request ----

    def generate(self, prompt: Any, sampling_params: SamplingParams, request_id: str,
                 **kwargs: Any) -> AsyncIterator[RequestOutput]:
        """vLLM's ``EngineClient.generate``: admits now (refusals raise here), generates when iterated."""
        params = sampling_params
        record = self.records.of(params.extra_args)
        if record is not None:  # the front end's key stays in the front end
            params.extra_args = {k: v for k, v in params.extra_args.items() if k != HTTP_REQUEST_KEY} or None
        tokens = _token_prompt(prompt)
        if tokens is None:  # embeddings, streaming input, a ready EngineCoreRequest: the plugin's budget rule
            return self.engine.generate(prompt, params, request_id, **kwargs)
        # A grammar cannot resume inside a new engine request, and only deltas or a final output can be stitched.
        resumable = params.structured_outputs is None and params.output_kind in (RequestOutputKind.DELTA,
                                                                                 RequestOutputKind.FINAL_ONLY)
        lead = self.side.lead(len(tokens)) if self.start_by_lead else 0
        try:
            admission = admit(self.ladder, len(tokens), params.max_tokens, self.policy, pinned_set(params.extra_args),
                              resumable, lead)
        except Refusal as refusal:
            if record is not None and record.refusal is None:
                record.refusal = refusal
            raise vllm_error(refusal) from None
        name = self.ladder.sets[admission.index].name
        # Only an HTTP request's choices are counted (a beam search's per-step engine requests have no record).
        metrics = self.metrics if record is not None else None
        runners = [ChoiceRunner(ChoiceRun(name, len(tokens)), metrics, self.side.rates) for _ in range(params.n)]
        if record is not None:
            record.runs.extend(runner.run for runner in runners)
        if admission.promotable:
            choices = promoting_choices(self.engine, self.ladder, prompt, tokens, params, request_id, kwargs,
                                        admission.index, runners, self.side)
            outputs = fan_out(choices, request_id, params.output_kind is RequestOutputKind.FINAL_ONLY)
            return self._admitted(outputs, runners, request_id, choices)
        params.extra_args = naming_set(params.extra_args, name)
        outputs = self._passed_through(self.engine.generate(prompt, params, request_id, **kwargs), runners,
                                       len(tokens))
        return self._admitted(outputs, runners, request_id)

    def _admitted(self, outputs: AsyncIterator[RequestOutput], runners: list[ChoiceRunner], request_id: str,
                  choices: list[PromotingChoice] | None = None) -> AsyncIterator[RequestOutput]:
        """``outputs``, with the request counted as running from now (the drain waits for it even before vLLM
        iterates it) until it ends or is dropped unstarted; its unfinished choices end as aborted."""
        self.running += 1
        if choices:
            self.promoting[request_id] = choices
        ended = False

        def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                self.running -= 1
                if self.promoting.get(request_id) is choices:
                    self.promoting.pop(request_id, None)
                for runner in runners:
                    runner.finish("aborted")

        async def passed_on() -> AsyncIterator[RequestOutput]:
            try:
                async with aclosing(outputs) as gen:
                    async for output in gen:
                        yield output
            finally:
                end()

        wrapped = passed_on()
        weakref.finalize(wrapped, end)
        return wrapped

    @staticmethod
    async def _passed_through(outputs: AsyncIterator[RequestOutput], runners: list[ChoiceRunner],
                              prompt_tokens: int) -> AsyncIterator[RequestOutput]:
        """A request that stays in its set: vLLM's own outputs, unchanged, each choice's observed by its runner
        (the engine request's prefill once, by the first)."""
        for i, runner in enumerate(runners):
            runner.segment_started(prompt_tokens if i == 0 else 0)
        try:
            async with aclosing(outputs) as gen:
                async for output in gen:
                    for completion in output.outputs:
                        runner = runners[completion.index]
                        runner.observe(completion, output)
                        if completion.finish_reason is not None:
                            runner.finish(completion.finish_reason)
                    yield output
        except Exception:
            for runner in runners:
                runner.finish("error")
            raise


def _exit_text(code: int) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL`` (multiprocessing's negative exit codes)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
