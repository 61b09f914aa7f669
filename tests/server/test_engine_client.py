"""The engine client over a fake AsyncLLM (fast): admission, promotion's stitching, stop strings across a
switch, n > 1, final-only output, abort, drain and engine death.

The fake engine's next token is a function of the whole sequence (and the seed), so a choice cut into
segments must produce exactly the tokens of one uninterrupted run: any token lost, repeated or
generated from the wrong context across a switch shows. The real engine is proven by
tests/server/test_promotion.py against the transformers reference.
"""

from __future__ import annotations

import asyncio
import functools
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from vllm.exceptions import GracefulHTTPError, VLLMValidationError
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.exceptions import EngineDeadError

from rope_ext.models.tiny import tiny_ladder
from rope_ext.protocol import ROPE_SET_KEY
from rope_ext.selection import Policy
from server.choices import ChoiceRun
from server.engine_client import LadderEngineClient
from server.metrics import ServerMetrics
from server.request_records import HTTP_REQUEST_KEY

pytestmark = pytest.mark.unit

LADDER = tiny_ladder()  # windows 256, 512, 1024
SHORT, MID = LADDER.sets[0].window, LADDER.sets[1].window


@functools.cache
def letter_tokenizer():
    """vLLM's own tokenizer over a word-level vocabulary of the 26 letters (token i is letter i): the one the
    fake engine's text is written in, so vLLM's detokenizer decodes it as the fake engine does."""
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from vllm.tokenizers import get_tokenizer

    vocab = {chr(ord("a") + i): i for i in range(26)} | {"<unk>": 26}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    folder = tempfile.mkdtemp(prefix="letters-")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)
    return get_tokenizer(folder)


def next_token(sequence: list[int], seed: int) -> int:
    return (sum(sequence[-3:]) * 31 + len(sequence) + seed) % 26


def letter(token: int) -> str:
    return chr(ord("a") + token)


def uninterrupted(prompt: list[int], max_tokens: int, seed: int = 0) -> list[int]:
    """What one engine request with no window would generate."""
    sequence = list(prompt)
    for _ in range(max_tokens):
        sequence.append(next_token(sequence, seed))
    return sequence[len(prompt):]


BLOCK = 16  # the fake prefix cache's block size, as vLLM's: only whole blocks are cached


@dataclass
class Call:
    request_id: str
    set_name: str | None
    prompt: list[int]
    params: SamplingParams
    cached: int = 0  # prompt tokens found in the prefix cache of its set
    kwargs: dict = field(default_factory=dict)
    produced: int = 0
    ended: str = "running"  # finished, or closed (the client left: vLLM aborts the request)


@dataclass
class FakeEngine:
    """AsyncLLM's ``generate`` and the lifecycle methods the engine client calls, with a prefix cache per set
    (a prompt's whole blocks, cached once its prefill ran)."""

    calls: list[Call] = field(default_factory=list)
    errored: bool = False
    shut_down: bool = False
    exits: dict[str, int] = field(default_factory=dict)
    prefix_caching: bool = True
    prefilled: list[tuple[str | None, list[int]]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)  # request ids whose first output raises instead
    slow_start: dict[str, float] = field(default_factory=dict)  # request id: seconds before its first output

    @property
    def tokenizer(self):
        return letter_tokenizer()

    def __post_init__(self):
        self.engine_core = SimpleNamespace(resources=SimpleNamespace(
            engine_manager=SimpleNamespace(finished_procs=lambda: self.exits)))
        self.vllm_config = SimpleNamespace(cache_config=SimpleNamespace(enable_prefix_caching=self.prefix_caching,
                                                                         block_size=BLOCK))

    def generate(self, prompt, params: SamplingParams, request_id: str, **kwargs):
        call = Call(request_id, (params.extra_args or {}).get(ROPE_SET_KEY), list(prompt["prompt_token_ids"]),
                    params, kwargs=kwargs)
        call.cached = max((_common_blocks(call.prompt, seen) for name, seen in self.prefilled
                           if name == call.set_name), default=0)
        self.calls.append(call)
        return self._outputs(call)

    async def _outputs(self, call: Call):
        params = call.params
        await asyncio.sleep(self.slow_start.get(call.request_id, 0))
        if call.request_id in self.failing:
            raise RuntimeError(f"engine request {call.request_id} failed")
        try:
            reported = False  # prompt logprobs come with the request's first output
            reported_prefill = False
            for index in range(params.n):
                sequence = list(call.prompt)
                tokens: list[int] = []
                for step in range(params.max_tokens):
                    token = next_token(sequence, (params.seed or 0) + index)
                    sequence.append(token)
                    tokens.append(token)
                    call.produced += 1
                    last = step == params.max_tokens - 1
                    if params.output_kind is RequestOutputKind.FINAL_ONLY and not last:
                        continue
                    piece = tokens if params.output_kind is RequestOutputKind.FINAL_ONLY else [token]
                    running = -0.5 * (step + 1)  # vLLM's cumulative logprob: this engine request's total so far
                    completion = CompletionOutput(index, "".join(map(letter, piece)), piece, running, None,
                                                  finish_reason="length" if last else None)
                    wanted = params.prompt_logprobs is not None and not reported
                    prompt_logprobs = ["prompt logprobs"] if wanted else None
                    reported = True
                    if not reported_prefill:
                        self.prefilled.append((call.set_name, call.prompt))
                        reported_prefill = True
                    yield RequestOutput(call.request_id, None, call.prompt, prompt_logprobs, [completion],
                                        finished=last and index == params.n - 1, num_cached_tokens=call.cached)
                    await asyncio.sleep(0)
            call.ended = "finished"
        finally:
            if call.ended == "running":
                call.ended = "closed"

    def check_admission(self, n=1, request_id=None):
        pass

    async def abort(self, request_id, internal=False):
        self.aborted.extend([request_id] if isinstance(request_id, str) else request_id)

    async def check_health(self):
        if self.errored:
            raise EngineDeadError()

    def shutdown(self, timeout=None):
        self.shut_down = True


def _common_blocks(a: list[int], b: list[int]) -> int:
    """Tokens of the longest common prefix, in whole blocks."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n // BLOCK * BLOCK


def client(policy: Policy = Policy.DYNAMIC, side_lead: int = 0, start_by_lead: bool = True,
           prefix_caching: bool = True) -> tuple[LadderEngineClient, FakeEngine]:
    engine = FakeEngine(prefix_caching=prefix_caching)
    return LadderEngineClient(engine, LADDER, policy, ServerMetrics("m"), side_lead, start_by_lead), engine


def params(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, output_kind=kwargs.pop("output_kind", RequestOutputKind.DELTA),
                          **kwargs)


def collect(outputs, stop_after: int | None = None) -> list[RequestOutput]:
    async def run():
        got = []
        async for output in outputs:
            got.append(output)
            if stop_after is not None and len(got) >= stop_after:
                break
        await outputs.aclose()
        return got

    return asyncio.run(run())


def generate_recorded(ladder_client: LadderEngineClient, prompt: list[int], sampling: SamplingParams,
                      request_id: str = "r"):
    """``generate`` as vLLM's app calls it for an HTTP request the middleware opened a record for."""
    http_id, record = ladder_client.records.open("http")
    sampling.extra_args = {**(sampling.extra_args or {}), HTTP_REQUEST_KEY: http_id}
    return ladder_client.generate({"prompt_token_ids": prompt}, sampling, request_id), record


def admitted(ladder_client: LadderEngineClient, prompt: list[int], sampling: SamplingParams,
             request_id: str = "r") -> tuple[list[RequestOutput], list[ChoiceRun]]:
    outputs, record = generate_recorded(ladder_client, prompt, sampling, request_id)
    return collect(outputs), record.runs


def tokens_of(outputs: list[RequestOutput], index: int = 0) -> list[int]:
    return [t for o in outputs for c in o.outputs if c.index == index for t in c.token_ids]


PROMPT = [3] * (SHORT - 6)  # 6 tokens of room in the short set


def test_a_request_that_fits_runs_as_vllms_own_request_in_its_set():
    ladder_client, engine = client()
    outputs, runs = admitted(ladder_client, [1] * 100, params(20))
    assert [(c.request_id, c.set_name, c.params.max_tokens) for c in engine.calls] == [("r", "short", 20)]
    assert tokens_of(outputs) == uninterrupted([1] * 100, 20)
    assert runs[0].promotions == [] and runs[0].outcome == "length" and ladder_client.running == 0


def test_promotion_stitches_segments_into_one_sequence():
    ladder_client, engine = client()
    outputs, runs = admitted(ladder_client, PROMPT, params(30, prompt_logprobs=0))
    assert [(c.request_id, c.set_name, len(c.prompt), c.params.max_tokens) for c in engine.calls] == [
        ("r", "short", SHORT - 6, 6), ("r-s1", "mid", SHORT, 24)]  # re-prefilled: prompt + the 6 generated
    assert engine.calls[1].params.prompt_logprobs is None  # reported once, by the first segment
    assert tokens_of(outputs) == uninterrupted(PROMPT, 30)  # nothing lost, repeated or out of context
    assert [o.outputs[0].finish_reason for o in outputs if o.outputs[0].finish_reason] == ["length"]
    assert [o.finished for o in outputs].count(True) == 1 and outputs[-1].finished
    assert {o.request_id for o in outputs} == {"r"} and all(o.prompt_token_ids == PROMPT for o in outputs)
    assert [p.as_dict() for p in runs[0].promotions] == [{"from": "short", "to": "mid", "at_tokens": SHORT}]
    assert runs[0].completion_tokens == 30 and runs[0].outcome == "length"


def test_two_promotions_and_min_tokens_carry_over():
    ladder_client, engine = client()
    outputs, runs = admitted(ladder_client, PROMPT, params(SHORT + 20, min_tokens=10))
    assert [c.set_name for c in engine.calls] == ["short", "mid", "long"]
    assert [c.params.min_tokens for c in engine.calls] == [10, 4, 0]
    assert tokens_of(outputs) == uninterrupted(PROMPT, SHORT + 20)
    assert [p.at_tokens for p in runs[0].promotions] == [SHORT, MID]


def test_a_stop_string_across_the_switch_stops_and_aborts_the_segment():
    whole = "".join(map(letter, uninterrupted(PROMPT, 30)))
    stop = whole[5:8]  # its first character comes from the short set, the rest from the next one
    assert whole.find(stop) == 5, "the fake model repeats this stop earlier; pick other positions"
    ladder_client, engine = client()
    outputs, runs = admitted(ladder_client, PROMPT, params(30, stop=[stop]))
    assert all(c.params.stop == [] for c in engine.calls)  # checked across segments, not per engine request
    assert "".join(c.text for o in outputs for c in o.outputs) == whole[:5]
    final = outputs[-1].outputs[0]
    assert (final.finish_reason, final.stop_reason, outputs[-1].finished) == ("stop", stop, True)
    assert engine.calls[-1].ended == "closed" and runs[0].outcome == "stop"


@pytest.mark.parametrize("hold", [False, True])
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_follow_vllms_rule_across_the_switch(hold, include):
    """vLLM's own detokenizer decides, over the whole choice: min_tokens holds a stop back (the promotable
    path once ignored it and stopped at the first match), include_stop_str_in_output keeps it. The stop
    string is a letter that occurs after the switch (6 tokens in) and again later."""
    whole = "".join(map(letter, uninterrupted(PROMPT, 30)))
    first = next(i for i in range(6, 20) if whole.find(whole[i], i + 4) > 0 and whole.find(whole[i]) == i)
    stop, later = whole[first], whole.find(whole[first], first + 4)
    min_tokens, at = (first + 2, later) if hold else (0, first)
    ladder_client, _ = client()
    outputs, runs = admitted(ladder_client, PROMPT, params(30, stop=[stop], min_tokens=min_tokens,
                                                               include_stop_str_in_output=include))
    text = "".join(c.text for o in outputs for c in o.outputs)
    assert text == whole[: at + (1 if include else 0)]
    assert outputs[-1].outputs[0].stop_reason == stop and runs[0].outcome == "stop" and runs[0].promotions


def test_n_choices_each_promoted_on_their_own_with_their_own_seed():
    ladder_client, engine = client()
    outputs, runs = admitted(ladder_client, PROMPT, params(20, n=2, seed=7))
    assert sorted((c.request_id, c.set_name, c.params.seed) for c in engine.calls) == [
        ("r-0", "short", 7), ("r-0-s1", "mid", 7), ("r-1", "short", 8), ("r-1-s1", "mid", 8)]
    for i in range(2):
        assert tokens_of(outputs, i) == uninterrupted(PROMPT, 20, seed=7 + i)
    assert tokens_of(outputs, 0) != tokens_of(outputs, 1)
    assert {o.request_id for o in outputs} == {"r"}
    assert [len(r.promotions) for r in runs] == [1, 1]


@pytest.mark.parametrize("side_lead", [0, 4])  # segments asked for one final output each, or (side prefills) deltas
def test_final_only_output_is_one_output_with_every_token(side_lead):
    ladder_client, _ = client(side_lead=side_lead)
    prompt = [3] * (SHORT - 10)
    outputs, _ = admitted(ladder_client, prompt, params(30, prompt_logprobs=0,
                                                        output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(outputs) == 1 and outputs[0].finished
    final = outputs[0].outputs[0]
    assert list(final.token_ids) == uninterrupted(prompt, 30)
    assert final.text == "".join(map(letter, final.token_ids)) and final.finish_reason == "length"
    assert final.cumulative_logprob == -0.5 * 30  # both segments' totals, each counted once
    assert outputs[0].prompt_logprobs == ["prompt logprobs"]  # the first segment's


def test_a_side_prefill_carries_the_requests_engine_arguments():
    """Its LoRA adapter keys the prefix cache: a side prefill without it would cache blocks nobody reads."""
    ladder_client, engine = client(side_lead=4)
    collect(ladder_client.generate({"prompt_token_ids": [3] * (SHORT - 10)}, params(30), "r",
                                   lora_request="adapter", priority=2))
    side = [c for c in engine.calls if "-prefill" in c.request_id]
    assert side and all(c.kwargs == {"lora_request": "adapter", "priority": 2} for c in side)


def test_final_only_with_n_merges_the_choices():
    ladder_client, _ = client()
    outputs, _ = admitted(ladder_client, PROMPT, params(20, n=2, seed=1, output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(outputs) == 1 and [c.index for c in outputs[0].outputs] == [0, 1]
    assert [list(c.token_ids) for c in outputs[0].outputs] == [uninterrupted(PROMPT, 20, 1),
                                                               uninterrupted(PROMPT, 20, 2)]


def test_a_client_that_leaves_aborts_the_engine_request():
    ladder_client, engine = client()
    outputs, record = generate_recorded(ladder_client, PROMPT, params(30))
    got = collect(outputs, stop_after=2)
    assert len(got) == 2 and engine.calls[-1].ended == "closed" and engine.calls[-1].produced == 2
    assert ladder_client.running == 0 and record.runs[0].outcome == "aborted"


def test_pinned_or_constrained_or_budget_requests_never_promote():
    from vllm.sampling_params import StructuredOutputsParams

    for sampling, policy in ((params(30, extra_args={ROPE_SET_KEY: "mid"}), Policy.DYNAMIC),
                             (params(30, structured_outputs=StructuredOutputsParams(regex="[a-z]+")), Policy.DYNAMIC),
                             (params(30), Policy.BUDGET)):
        ladder_client, engine = client(policy)
        outputs, runs = admitted(ladder_client, PROMPT, sampling)
        assert [(c.set_name, c.params.max_tokens) for c in engine.calls] == [("mid", 30)]
        assert runs[0].promotions == [] and tokens_of(outputs) == uninterrupted(PROMPT, 30)


@pytest.mark.parametrize("extra,prompt_len,code,param", [
    ({ROPE_SET_KEY: "huge"}, 10, "unknown_rope_set", "rope_set"),
    ({ROPE_SET_KEY: "short"}, SHORT - 5, "context_length_exceeded", "rope_set"),
    (None, LADDER.max_window, "context_length_exceeded", "max_tokens"),
])
def test_refusals_raise_at_the_call_with_their_code(extra, prompt_len, code, param):
    ladder_client, engine = client()
    with pytest.raises(VLLMValidationError) as info:
        generate_recorded(ladder_client, [1] * prompt_len, params(10, extra_args=extra))
    record = ladder_client.records.of({HTTP_REQUEST_KEY: "http"})
    assert info.value.parameter == param and (record.refusal.code, record.refusal.param) == (code, param)
    assert engine.calls == [] and ladder_client.running == 0


def test_drain_refuses_new_requests_and_health_then_stops_the_engine():
    ladder_client, engine = client()
    ladder_client.shutdown(timeout=1)
    assert engine.shut_down and ladder_client.death_reason() is None
    with pytest.raises(GracefulHTTPError):
        ladder_client.check_admission()
    with pytest.raises(EngineDeadError):
        asyncio.run(ladder_client.check_health())


def test_an_engine_that_died_says_which_process_and_how():
    ladder_client, engine = client()
    assert ladder_client.death_reason() is None
    engine.errored, engine.exits = True, {"EngineCore": -9}
    assert ladder_client.death_reason().startswith("process EngineCore was killed by SIGKILL")
    engine.exits = {"EngineCore": 1}
    assert ladder_client.death_reason().startswith("process EngineCore exited with status 1")
    engine.exits = {}
    assert ladder_client.death_reason().startswith("the engine core reported a fatal error")


def metric(ladder_client: LadderEngineClient, name: str, **labels) -> float:
    return ladder_client.metrics.registry.get_sample_value(name, {"model": "m", **labels}) or 0.0


def block_by_block(ladder_client: LadderEngineClient) -> None:
    """Rates at which an increment is one block whatever the fake's decode steps measure (a token a second)."""
    ladder_client.side.rates.prefill_tokens_per_s = 1.0


def side_requests(engine: FakeEngine) -> list[Call]:
    return [c for c in engine.calls if "-prefill" in c.request_id]


def test_side_prefills_fill_the_next_sets_cache_one_increment_at_a_time():
    """Before the short window, one-token side requests in the mid set prefill the sequence block by block: each
    is a prefix of the sequence in whole blocks, finds the previous one's blocks cached and computes one block; the
    continuation finds the last one's blocks. The output is what it was without them."""
    ladder_client, engine = client(side_lead=4096)
    block_by_block(ladder_client)
    prompt = [3] * (SHORT - 100)
    outputs, runs = admitted(ladder_client, prompt, params(150))
    side = side_requests(engine)
    assert len(side) >= (SHORT - 2 * BLOCK) // BLOCK, [len(c.prompt) for c in side]
    assert all(c.set_name == "mid" and c.params.max_tokens == 1 for c in side)
    assert all(c.params.output_kind is RequestOutputKind.FINAL_ONLY for c in side)
    assert [len(c.prompt) for c in side] == [BLOCK * (i + 1) for i in range(len(side))]
    assert [c.cached for c in side] == [BLOCK * i for i in range(len(side))]
    sequence = prompt + tokens_of(outputs)
    assert all(c.prompt == sequence[:len(c.prompt)] for c in side)
    (promotion,) = runs[0].promotions
    continuation = engine.calls[-1]
    assert continuation.request_id == "r-s1" and continuation.cached == len(side[-1].prompt) == promotion.cached_tokens
    assert promotion.side_prefills == len(side) and tokens_of(outputs) == uninterrupted(prompt, 150)
    assert len(runs) == 1 and metric(ladder_client, "longrope_requests_finished_total", rope_set="mid",
                                     outcome="length") == 1  # the side requests are no requests of ours
    assert metric(ladder_client, "longrope_side_prefills_total", rope_set="mid") == len(side)
    assert metric(ladder_client, "longrope_promotion_cached_tokens_total", from_set="short",
                  to_set="mid") == promotion.cached_tokens
    assert metric(ladder_client, "longrope_promotion_stall_seconds_count", from_set="short", to_set="mid") == 1


def test_one_increment_is_in_the_engine_at_a_time():
    """Two choices warming toward their switches take turns: no side request starts while another runs."""
    ladder_client, engine = client(side_lead=4096)
    block_by_block(ladder_client)
    running: list[int] = []  # at each side request's start, how many others are running
    generate = engine.generate

    def counting(prompt, sampling, request_id, **kwargs):
        if "-prefill" in request_id:
            running.append(sum(c.ended == "running" for c in side_requests(engine)))
        return generate(prompt, sampling, request_id, **kwargs)

    engine.generate = counting
    outputs, runs = admitted(ladder_client, [3] * (SHORT - 100), params(150, n=2, seed=1))
    side = side_requests(engine)
    assert {c.request_id.split("-prefill")[0] for c in side} == {"r-0", "r-1"}
    assert running and max(running) == 0 and [p.side_prefills for r in runs for p in r.promotions] == [
        sum(c.request_id.startswith("r-0-") for c in side), sum(c.request_id.startswith("r-1-") for c in side)]


@pytest.mark.parametrize("side_lead,prefix_caching", [(0, True), (40, False)])
def test_no_side_prefill_when_off_or_without_prefix_caching(side_lead, prefix_caching):
    ladder_client, engine = client(side_lead=side_lead, prefix_caching=prefix_caching)
    outputs, runs = admitted(ladder_client, PROMPT, params(30))
    assert [c.request_id for c in engine.calls] == ["r", "r-s1"]
    assert runs[0].promotions[0].side_prefills == 0 and tokens_of(outputs) == uninterrupted(PROMPT, 30)


def test_too_little_room_to_hide_the_prefill_starts_in_the_next_set():
    """6 tokens of room in the short set, a lead of 40: the request starts in mid and never stalls; the window
    rule (start_by_lead off) keeps it in short."""
    ladder_client, engine = client(side_lead=40)
    outputs, runs = admitted(ladder_client, PROMPT, params(30))
    assert [(c.set_name, c.params.max_tokens) for c in engine.calls] == [("mid", 30)]
    assert runs[0].promotions == [] and tokens_of(outputs) == uninterrupted(PROMPT, 30)
    ladder_client, engine = client(side_lead=40, start_by_lead=False)
    admitted(ladder_client, PROMPT, params(30))
    assert engine.calls[0].set_name == "short"


def test_increments_and_the_lead_follow_the_measured_rates():
    """An increment is the prefill of PREFILL_SHARE decode steps in whole blocks (one at least); the lead is the
    stream's tokens that the increments over a prefill take, times the requests taking turns, with a margin;
    capped by the flag; none without side prefills."""
    from server.side_prefill import MARGIN, PREFILL_SHARE, TOKENS_PER_INCREMENT, SidePrefills

    side = SidePrefills(None, 4096, True, 128, None)
    side.rates.prefill_tokens_per_s, side.rates.decode_s_per_token = 10000.0, 0.1
    assert side.increment() == int(PREFILL_SHARE * 1000) // 128 * 128 == 896
    assert side.increment(decode_s_per_token=0.01) == 128  # 100 tokens: still a whole block
    assert side.lead(8192) == math.ceil(MARGIN * math.ceil(8192 / 896) * TOKENS_PER_INCREMENT)
    assert side.lead(8192, turns=3) == math.ceil(MARGIN * math.ceil(8192 / 896) * TOKENS_PER_INCREMENT * 3)
    side.rates.prefill_tokens_per_s = 280.0  # a block takes longer than a step: one block per increment
    assert side.lead(8192) == math.ceil(MARGIN * 64 * TOKENS_PER_INCREMENT)
    assert SidePrefills(None, 100, True, 128, None).lead(8192) == 100
    assert SidePrefills(None, 0, True, 128, None).lead(8192) == SidePrefills(None, 4096, False, 128, None).lead(
        8192) == 0
    side.rates.prefilled(1000, 1.0)  # a measured prefill moves the estimate half way
    assert side.rates.prefill_tokens_per_s == (280.0 + 1000.0) / 2


def test_the_record_key_stays_in_the_front_end():
    """The middleware's key names the HTTP request's record; the engine never sees it (segments neither)."""
    ladder_client, engine = client()
    outputs, record = generate_recorded(ladder_client, PROMPT, params(30))
    collect(outputs)
    assert record.runs and all(HTTP_REQUEST_KEY not in (c.params.extra_args or {}) for c in engine.calls)



def test_the_drain_counts_a_request_from_its_admission():
    """vLLM calls generate, then iterates later: the drain must wait for a request admitted but not started;
    one dropped unstarted (its client left before the first output) stops counting."""
    import gc

    ladder_client, _ = client()
    outputs, record = generate_recorded(ladder_client, PROMPT, params(30))
    assert ladder_client.running == 1
    del outputs
    gc.collect()
    assert ladder_client.running == 0 and record.runs[0].outcome == "aborted"


def test_abort_by_id_reaches_every_engine_request_of_a_promoted_choice():
    """vLLM's abort(request_id) once reached the first segment only: after a switch the engine request is
    'r-s1', and choices of n > 1 run as 'r-0', 'r-1'."""
    async def run():
        ladder_client, engine = client()
        outputs, _ = generate_recorded(ladder_client, [1] * (SHORT - 5), params(30))
        async for output in outputs:
            if engine.calls[-1].request_id == "r-s1":
                break
        await ladder_client.abort("r")
        await outputs.aclose()
        return engine.aborted

    assert asyncio.run(run()) == ["r", "r-s1"]


def test_a_failed_choice_stops_its_siblings():
    """A non-streamed n = 2 request whose choice 0 fails: choice 1 stops generating too (it went on before)."""
    ladder_client, engine = client()
    engine.failing.add("r-0")
    engine.slow_start["r-1"] = 0.0
    outputs, record = generate_recorded(ladder_client, [1] * (SHORT - 5),
                                        params(200, n=2, seed=1, output_kind=RequestOutputKind.FINAL_ONLY))
    with pytest.raises(RuntimeError, match="r-0 failed"):
        collect(outputs)
    sibling = [c for c in engine.calls if c.request_id.startswith("r-1")]
    assert sibling and all(c.ended == "closed" for c in sibling) and sum(c.produced for c in sibling) < 200
    assert [r.outcome for r in record.runs] == ["error", "aborted"] and ladder_client.running == 0


def test_each_gap_the_client_sees_is_an_inter_token_latency_and_the_switch_shows():
    """One observation per delivery after the first (not each segment's average), so the stall at a switch is
    one of them: the continuation here waits 0.3 s before its first token."""
    ladder_client, engine = client()
    engine.slow_start["r-s1"] = 0.3
    outputs, record = generate_recorded(ladder_client, [1] * (SHORT - 5), params(12))
    collect(outputs)
    labels = {"rope_set": "mid"}
    assert metric(ladder_client, "longrope_inter_token_latency_seconds_count", rope_set="short") + metric(
        ladder_client, "longrope_inter_token_latency_seconds_count", **labels) == 11
    assert metric(ladder_client, "longrope_inter_token_latency_seconds_bucket", le="0.25", **labels) < metric(
        ladder_client, "longrope_inter_token_latency_seconds_count", **labels)
    (promotion,) = record.runs[0].promotions
    assert promotion.stall_s >= 0.3
    assert metric(ladder_client, "longrope_time_to_first_token_seconds_count", rope_set="short") == 1


def test_engine_requests_that_are_no_clients_choice_are_not_counted():
    """vLLM's beam search calls generate once per beam and step, with no record: none is a finished choice."""
    ladder_client, _ = client()
    collect(ladder_client.generate({"prompt_token_ids": PROMPT}, params(1), "r-beam-0"))
    assert metric(ladder_client, "longrope_requests_finished_total", rope_set="short", outcome="length") == 0
    outputs, _ = generate_recorded(ladder_client, PROMPT, params(1))
    collect(outputs)
    assert metric(ladder_client, "longrope_requests_finished_total", rope_set="short", outcome="length") == 1
