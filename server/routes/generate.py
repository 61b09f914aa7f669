"""What chat completions and completions share: admission, sampling, choices, streaming, shapes.

The route turns the body into prompt token ids; from there one flow serves both endpoints,
with ``kind`` deciding only the response shapes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from vllm.sampling_params import SamplingParams, StructuredOutputsParams

from rope_ext.selection import ContextLengthExceeded, Policy, UnknownSet, choose_set
from server.errors import APIError, bad_request
from server.generation import ChoiceRun, Delta, generate_choice
from server.protocol import UNSUPPORTED, ChatCompletionRequest, CompletionRequest

Kind = Literal["chat", "completion"]


def check_request(request: Request, body: ChatCompletionRequest | CompletionRequest) -> Any:
    """Readiness, model name and unsupported fields; returns the served model."""
    model = request.app.state.model
    if not model.ready:
        raise APIError(503, "The model is not ready; try again shortly.", "service_unavailable")
    name = request.app.state.settings.model_name
    if body.model != name:
        raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{name}`.",
                       "invalid_request_error", param="model", code="model_not_found")
    for field in UNSUPPORTED:
        if getattr(body, field, None) is not None:
            raise bad_request(f"`{field}` is not supported by this server.", param=field,
                              code="unsupported_parameter")
    return model


def sampling_params(body: ChatCompletionRequest | CompletionRequest, logprobs: int | None) -> SamplingParams:
    structured = None
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.type == "json_object":
        structured = StructuredOutputsParams(json_object=True)
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise bad_request("response_format.json_schema is required for type json_schema",
                              param="response_format.json_schema")
        structured = StructuredOutputsParams(json=response_format.json_schema.json_schema)
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        min_p=body.min_p or 0.0,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        logprobs=logprobs,
        ignore_eos=body.ignore_eos,
        structured_outputs=structured,
    )


def _token_text(tokenizer: Any, token_id: int, logprob: Any) -> str:
    return logprob.decoded_token if logprob.decoded_token is not None else tokenizer.decode([token_id])


def _ranked(options: dict[int, Any], top: int) -> list[tuple[int, Any]]:
    return sorted(options.items(), key=lambda kv: kv[1].rank or 0)[:top]


def _chat_logprobs(tokenizer: Any, delta: Delta, top: int) -> list[dict]:
    def item(token_id: int, logprob: Any) -> dict:
        text = _token_text(tokenizer, token_id, logprob)
        return {"token": text, "logprob": logprob.logprob, "bytes": list(text.encode())}

    return [
        {**item(token_id, options[token_id]), "top_logprobs": [item(t, lp) for t, lp in _ranked(options, top)]}
        for token_id, options in zip(delta.token_ids, delta.logprobs)
    ]


def _completion_logprobs(tokenizer: Any, delta: Delta, top: int, offset: int) -> dict:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, options in zip(delta.token_ids, delta.logprobs):
        text = _token_text(tokenizer, token_id, options[token_id])
        out["tokens"].append(text)
        out["token_logprobs"].append(options[token_id].logprob)
        out["top_logprobs"].append({_token_text(tokenizer, t, lp): lp.logprob for t, lp in _ranked(options, top)})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


async def _merge(generators: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave the choices' deltas as they come; cancelling this cancels (and aborts) them all."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(index: int, gen: AsyncIterator[Delta]) -> None:
        try:
            async for delta in gen:
                await queue.put((index, delta))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((index, exc))
        finally:
            await queue.put((index, end))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _promotions_header(runs: list[ChoiceRun]) -> str:
    return ", ".join(f"{p.from_set}->{p.to_set}@{p.at_tokens}" for p in runs[0].promotions)


async def respond(
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    kind: Kind,
    prompt_ids: list[int],
    default_max_tokens: int | None,
) -> JSONResponse | StreamingResponse:
    model = request.app.state.model
    settings = request.app.state.settings
    ladder = model.ladder
    prompt_param = "messages" if kind == "chat" else "prompt"
    max_tokens = body.token_budget() or default_max_tokens or max(ladder.max_window - len(prompt_ids), 1)
    structured = getattr(body, "response_format", None) is not None and body.response_format.type != "text"
    # A grammar cannot resume in a new engine request, so structured output is admitted whole (no promotion).
    policy = Policy.BUDGET if structured else settings.rope_policy
    try:
        start_set = ladder.sets[choose_set(ladder, len(prompt_ids), max_tokens, policy, body.rope_set)].name
    except ContextLengthExceeded as exc:
        request.app.state.metrics.refused.labels(settings.model_name).inc()
        raise bad_request(str(exc), param=prompt_param, code="context_length_exceeded") from None
    except UnknownSet as exc:
        raise bad_request(str(exc), param="rope_set", code="unknown_rope_set") from None

    if kind == "chat":
        top = body.top_logprobs or 0
        want_logprobs = body.logprobs
    else:
        top = body.logprobs or 0
        want_logprobs = body.logprobs is not None
    params = sampling_params(body, top if want_logprobs else None)
    request_id = request.state.request_id
    created = int(time.time())
    object_name = "chat.completion" if kind == "chat" else "text_completion"
    runs = [ChoiceRun() for _ in range(body.n)]
    metrics = request.app.state.metrics

    def record() -> None:
        for run in runs:
            if run.start_set:  # the choice reached the engine
                metrics.choice_done(run)

    def choice_params(i: int) -> SamplingParams:
        p = params.clone()
        if body.seed is not None:
            p.seed = body.seed + i  # n choices from one seed must still differ
        return p

    generators = [
        generate_choice(model.engine, f"{request_id}-c{i}", prompt_ids, choice_params(i), max_tokens, ladder,
                        policy, body.rope_set, body.stop_strings(), runs[i])
        for i in range(body.n)
    ]
    tokenizer = model.tokenizer

    def usage() -> dict:
        completion = sum(run.completion_tokens for run in runs)
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                "total_tokens": len(prompt_ids) + completion}

    def rope_info(i: int) -> dict:
        return {"rope_set": runs[i].final_set, "rope_promotions": [p.as_dict() for p in runs[i].promotions]}

    if not body.stream:
        texts = [""] * body.n
        finishes: list[str | None] = [None] * body.n
        chat_lp: list[list] = [[] for _ in range(body.n)]
        comp_lp: list[dict] = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                               for _ in range(body.n)]
        try:
            async for i, delta in _merge(generators):
                if want_logprobs and delta.token_ids:
                    if kind == "chat":
                        chat_lp[i].extend(_chat_logprobs(tokenizer, delta, top))
                    else:
                        part = _completion_logprobs(tokenizer, delta, top, len(texts[i]))
                        for key in comp_lp[i]:
                            comp_lp[i][key].extend(part[key])
                texts[i] += delta.text
                if delta.finish_reason:
                    finishes[i] = delta.finish_reason
        finally:
            record()
        choices = []
        for i in range(body.n):
            if kind == "chat":
                choice = {"index": i, "message": {"role": "assistant", "content": texts[i]},
                          "logprobs": {"content": chat_lp[i]} if want_logprobs else None,
                          "finish_reason": finishes[i]}
            else:
                choice = {"index": i, "text": texts[i], "logprobs": comp_lp[i] if want_logprobs else None,
                          "finish_reason": finishes[i]}
            choices.append({**choice, **rope_info(i)})
        payload = {"id": request_id, "object": object_name, "created": created, "model": body.model,
                   "choices": choices, "usage": usage()}
        headers = {"x-rope-set": runs[0].final_set, "x-rope-promotions": _promotions_header(runs)}
        return JSONResponse(payload, headers=headers)

    chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict], **extra: Any) -> str:
        data = {"id": request_id, "object": chunk_object, "created": created, "model": body.model,
                "choices": choices, **extra}
        return f"data: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        offsets = [0] * body.n
        role_sent = kind != "chat"
        try:
            async for i, delta in _merge(generators):
                if not role_sent:  # with the first output, as vLLM does: a client's TTFT is the first token's
                    role_sent = True
                    yield chunk([{"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for c in range(body.n)])
                if kind == "chat":
                    lp = {"content": _chat_logprobs(tokenizer, delta, top)} if want_logprobs else None
                    if delta.text or lp:
                        yield chunk([{"index": i, "delta": {"content": delta.text}, "logprobs": lp,
                                      "finish_reason": None}])
                    if delta.finish_reason:
                        yield chunk([{"index": i, "delta": {}, "logprobs": None,
                                      "finish_reason": delta.finish_reason, **rope_info(i)}])
                else:
                    lp = _completion_logprobs(tokenizer, delta, top, offsets[i]) if want_logprobs else None
                    offsets[i] += len(delta.text)
                    if delta.text or delta.finish_reason:
                        extra = rope_info(i) if delta.finish_reason else {}
                        yield chunk([{"index": i, "text": delta.text, "logprobs": lp,
                                      "finish_reason": delta.finish_reason, **extra}])
            if include_usage:
                yield chunk([], usage=usage())
        except Exception:  # noqa: BLE001 - the stream has started: report in-band, then end it
            error = {"message": f"generation failed (request {request_id})", "type": "server_error",
                     "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:
            record()  # also when the client went away: those choices count as aborted
        yield "data: [DONE]\n\n"

    # Headers leave before any promotion: a stream's header names its start set; each choice's
    # finishing chunk reports where it ended and how it got there.
    return StreamingResponse(events(), media_type="text/event-stream", headers={"x-rope-set": start_set})
