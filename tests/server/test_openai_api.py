"""The official openai client against `longrope serve` (SmolLM2, real engine, real uvicorn on loopback)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.server.conftest import API_KEY

pytestmark = pytest.mark.server

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smollm2_server):
    return openai.OpenAI(base_url=smollm2_server.v1, api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def make_aclient(smollm2_server):
    """An async client per event loop (its connection pool belongs to the loop that made it)."""
    return lambda: openai.AsyncOpenAI(base_url=smollm2_server.v1, api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_factual_answer_usage_and_headers(client, tokenizer):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, max_tokens=20, temperature=0, logprobs=True, top_logprobs=2,
        extra_headers={"X-Request-Id": "my-request-1"},
    )
    assert raw.headers["x-request-id"] == "my-request-1"
    assert raw.headers["x-rope-set"] == "short"
    reply = raw.parse()
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert reply.object == "chat.completion" and reply.model == MODEL and choice.message.role == "assistant"
    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(choice.logprobs.content) > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    for entry in choice.logprobs.content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_stream_equals_non_stream_and_ends_with_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_raw_sse_framing(smollm2_server):
    """The bytes on the wire: one `data:` line per event, events apart by a blank line, chat.completion.chunk
    objects of one id whose deltas add up to the answer, the finish reason on the last, then `data: [DONE]`."""
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{smollm2_server.v1}/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    assert raw.endswith("\n\ndata: [DONE]\n\n") and not raw.startswith("\n")
    events = raw.removesuffix("\n\n").split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    chunks = [json.loads(event[6:]) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    choices = [chunk["choices"][0] for chunk in chunks if chunk["choices"]]
    assert choices[0]["delta"]["role"] == "assistant"
    assert [c["finish_reason"] for c in choices].count(None) == len(choices) - 1 and choices[-1]["finish_reason"]
    reply = httpx.post(f"{smollm2_server.v1}/chat/completions", json={**body, "stream": False},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60).json()
    assert "".join(c["delta"].get("content") or "" for c in choices) == reply["choices"][0]["message"]["content"]


def test_async_client_stream_and_not(make_aclient):
    async def run():
        aclient = make_aclient()
        reply = await aclient.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
        stream = await aclient.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12,
                                                       temperature=0, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return reply.choices[0].message.content, text

    full, streamed = asyncio.run(run())
    assert full == streamed and "Paris" in full


def test_stop_string(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0,
                                           stop=["Paris"])
    assert "Paris" not in reply.choices[0].message.content
    assert reply.choices[0].message.content.startswith("The capital of France is")
    assert reply.choices[0].finish_reason == "stop"


def test_n_two_choices(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=1, seed=3, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content for c in reply.choices)
    assert reply.usage.completion_tokens == 16


def test_seed_is_deterministic_at_temperature_one(client):
    def ask(seed: int) -> str:
        return client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=1,
                                              seed=seed).choices[0].message.content

    first, again, other = ask(1234), ask(1234), ask(99)
    assert first == again
    assert first != other


def test_completions_with_logprobs(client):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                      logprobs=2)
    choice = reply.choices[0]
    assert reply.object == "text_completion"
    assert "Paris" in choice.text
    assert "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.top_logprobs[0]) == 2
    assert reply.usage.completion_tokens == 4 and choice.finish_reason == "length"


def test_json_schema_output_parses(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"]}
    reply = client.chat.completions.create(
        model=MODEL, max_tokens=60, temperature=0,
        messages=[{"role": "user", "content": "Name a city and its population as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    data = json.loads(reply.choices[0].message.content)
    assert isinstance(data["city"], str) and isinstance(data["population"], int)


def test_json_schema_on_completions(client):
    schema = {"type": "object", "properties": {"year": {"type": "integer"}}, "required": ["year"]}
    reply = client.completions.create(model=MODEL, prompt="The year the Eiffel Tower opened, as JSON:", max_tokens=30,
                                      temperature=0, extra_body={"response_format": {
                                          "type": "json_schema", "json_schema": {"name": "y", "schema": schema}}})
    assert isinstance(json.loads(reply.choices[0].text)["year"], int)


def test_structured_outputs_choice_and_regex(client):
    chosen = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, temperature=0,
                                            extra_body={"structured_outputs": {"choice": ["Paris", "London"]}})
    assert chosen.choices[0].message.content in ("Paris", "London")
    year = client.completions.create(model=MODEL, prompt="The Eiffel Tower opened in the year", max_tokens=10,
                                     temperature=0, extra_body={"structured_outputs": {"regex": "[0-9]{4}"}})
    assert re.fullmatch(r"[0-9]{4}", year.choices[0].text)
    assert year.choices[0].model_extra["rope_set"] == "short"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}


def test_named_tool_choice_returns_schema_valid_arguments(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], temperature=0,
        max_tokens=60, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)
    # the call goes back with the tool's answer, as agent frameworks send it
    follow = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=20, messages=[
        {"role": "user", "content": "What is the weather in Paris?"}, reply.choices[0].message.model_dump(),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}], tools=[WEATHER])
    assert follow.choices[0].finish_reason in ("stop", "length")


def test_sdk_parse_reply_goes_back_next_turn_with_metadata_and_store(client):
    from pydantic import BaseModel

    class City(BaseModel):
        city: str
        population: int

    asked = [{"role": "user", "content": "Name a city and its population as JSON."}]
    parsed = client.chat.completions.parse(model=MODEL, messages=asked, response_format=City, temperature=0,
                                           max_tokens=60)
    assert isinstance(parsed.choices[0].message.parsed, City)
    # .parse() leaves `parsed`, `refusal` and `annotations` on the message; the SDK sends them back
    again = client.chat.completions.create(
        model=MODEL, messages=[*asked, parsed.choices[0].message.model_dump(mode="json"),
                               {"role": "user", "content": "Thanks."}],
        max_tokens=8, temperature=0, metadata={"team": "search"}, store=False, service_tier="auto",
        extra_body={"prompt_cache_key": "k"})
    assert again.choices[0].message.content


def test_echo_prompt_logprobs_equal_the_reference(client, tokenizer, smollm2_dir):
    """What lm-eval-harness sends to score loglikelihood: a list of prompts, echo, logprobs 1."""
    from rope_ext.factors import load_ladder
    from rope_ext.models.smollm2 import DEFAULT_LADDER
    from rope_ext.selftest.reference import LOGPROB_TOLERANCE, ReferenceModel

    prompts = ["The capital of France is Paris, and the capital of Italy is Rome.",
               "Whales are the largest animals that have ever lived on Earth."]
    reply = client.completions.create(model=MODEL, prompt=prompts, max_tokens=1, temperature=0, echo=True,
                                      logprobs=1)
    ladder = load_ladder(DEFAULT_LADDER)
    reference = ReferenceModel(smollm2_dir, ladder, ladder.sets[0].window)
    assert [c.index for c in reply.choices] == [0, 1]
    for prompt, choice in zip(prompts, reply.choices):
        ids = tokenizer(prompt)["input_ids"]
        assert choice.text.startswith(prompt) and choice.model_extra["rope_set"] == "short"
        served = choice.logprobs.token_logprobs[: len(ids)]
        assert served[0] is None
        expected = reference.run(ids, 1, "short").prompt_logprobs
        assert served[1:] == pytest.approx(expected, abs=LOGPROB_TOLERANCE)


def test_tokenize_detokenize_round_trip(smollm2_server, tokenizer):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    text = "Long contexts, one request at a time."
    tokens = httpx.post(f"{smollm2_server.base}/tokenize", json={"model": MODEL, "prompt": text},
                        headers=headers).json()
    assert tokens["tokens"] == tokenizer(text)["input_ids"] and tokens["count"] == len(tokens["tokens"])
    back = httpx.post(f"{smollm2_server.base}/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]},
                      headers=headers).json()
    assert back["prompt"] == text


def test_responses_api_answers(client):
    response = client.responses.create(model=MODEL, input="What is the capital of France?", temperature=0,
                                       max_output_tokens=20)
    assert "Paris" in response.output_text


def test_content_as_text_parts(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    as_parts = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=12, temperature=0)
    as_string = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content


def test_models_lists_the_ladder(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert [s["name"] for s in models[0].model_extra["rope_sets"]] == ["short", "long", "long-32k"]


# ---- errors: status, type and code ----

def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


@pytest.mark.parametrize("body,param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": [10, 99_999_999]}, None),
    ({"prompt": "Hi", "top_k": -5}, None),
    ({"prompt": "Hi", "n": 0}, None),
    ({"prompt": "Hi", "max_tokens": "many"}, "body.max_tokens"),
    ({"prompt": "Hi", "temperature": 5}, "temperature"),
])
def test_client_mistakes_are_400_never_500(smollm2_server, body, param):
    response = httpx.post(f"{smollm2_server.v1}/completions", json={"model": MODEL, **body},
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and isinstance(error["code"], str) and error["message"]
    assert error["param"] == param


def test_prompt_no_set_holds_is_context_length_exceeded(client):
    err = error_of(lambda: client.completions.create(model=MODEL, prompt=[100] * 33000, max_tokens=4))
    assert err.status_code == 400 and err.body["code"] == "context_length_exceeded"
    assert "32768" in err.body["message"]


def test_max_tokens_absent_fills_the_window_and_stops_at_eos(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    assert reply.choices[0].finish_reason == "stop" and "Paris" in reply.choices[0].message.content


def test_pinned_set_too_small_is_refused(client):
    err = error_of(lambda: client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=9000,
                                                          extra_body={"rope_set": "short"}))
    assert err.status_code == 400 and err.body["code"] == "context_length_exceeded"
    assert err.body["param"] == "rope_set"


def test_unknown_set_is_refused_naming_it(client):
    for pin in ({"rope_set": "huge"}, {"vllm_xargs": {"rope_set": "huge"}}):
        err = error_of(lambda: client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4,
                                                              extra_body=pin))
        assert err.status_code == 400 and err.body["code"] == "unknown_rope_set" and "huge" in err.body["message"]


def test_pinned_by_field_or_vllm_xargs(client):
    for pin in ({"rope_set": "long"}, {"vllm_xargs": {"rope_set": "long"}}):
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION, max_tokens=4,
                                                                temperature=0, extra_body=pin)
        assert raw.headers["x-rope-set"] == "long"
        assert raw.parse().choices[0].model_extra["rope_set"] == "long"


def test_unknown_model_is_404(client):
    err = error_of(lambda: client.chat.completions.create(model="nope", messages=QUESTION))
    assert err.status_code == 404 and err.body["code"] == "model_not_found"


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_key_is_401(smollm2_server, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{smollm2_server.v1}/chat/completions", headers=headers,
                          json={"model": MODEL, "messages": QUESTION})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_second_key_works_and_health_is_open(smollm2_server):
    assert httpx.get(f"{smollm2_server.base}/health").status_code == 200
    response = httpx.get(f"{smollm2_server.v1}/models", headers={"Authorization": "Bearer test-key-2"})
    assert response.status_code == 200


def routes_of(server) -> list[tuple[str, str]]:
    """(method, path) of every route of the app's OpenAPI document, and the documents themselves."""
    schema = httpx.get(f"{server.base}/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert schema.status_code == 200
    routes = [(method.upper(), re.sub(r"\{[^}]+\}", "x", path))
              for path, item in schema.json()["paths"].items() for method in item]
    routes += [("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json")]  # not in the document itself
    assert ("POST", "/tokenize") in routes and ("GET", "/load") in routes and ("POST", "/v1/messages") in routes
    return routes


def test_every_route_but_the_probes_and_metrics_needs_the_key(smollm2_server):
    """Every route of the app's OpenAPI document (vLLM guards only /v1 and a few prefixes; we guard the rest)."""
    open_routes = {("GET", "/health"), ("GET", "/ping"), ("POST", "/ping"), ("GET", "/metrics")}  # /metrics: Prometheus
    for method, path in routes_of(smollm2_server):
        response = httpx.request(method, f"{smollm2_server.base}{path}", json={}, timeout=30)
        if (method, path) in open_routes:
            assert response.status_code == 200, f"{method} {path}: {response.status_code}"
        else:
            assert response.status_code == 401, f"{method} {path} answered {response.status_code} without the key"
            assert response.json()["error"]["code"] == "invalid_api_key", f"{method} {path}"


def _chunks(size: int):
    """A body with no Content-Length, in 64 kB chunks (Transfer-Encoding: chunked)."""
    for start in range(0, size, 65536):
        yield b"x" * min(65536, size - start)


@pytest.mark.parametrize("sized", [True, False], ids=["sized", "chunked"])
def test_every_route_refuses_a_body_over_the_limit(smollm2_server, sized):
    """The server's --max-body-bytes is 200000: on every route a larger body is 413, whether it says its size
    or is chunked (chunked bodies were once counted on the generation routes only: /tokenize read 3 MB)."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for method, path in routes_of(smollm2_server):
        body = b"x" * 300_000 if sized else _chunks(300_000)
        response = httpx.request(method, f"{smollm2_server.base}{path}", content=body, headers=auth, timeout=60)
        assert response.status_code == 413, f"{method} {path}: {response.status_code}"
        assert response.json()["error"]["code"] == "request_too_large"


def test_a_huge_request_id_is_replaced_and_options_never_passes_the_key(smollm2_server):
    """A 200 kB X-Request-Id once came back in every stream chunk (2 MB for 8 tokens) and in a 401."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    big = "r" * 200_000
    unkeyed = httpx.get(f"{smollm2_server.v1}/models", headers={"X-Request-Id": big}, timeout=30)
    assert unkeyed.status_code == 401 and len(unkeyed.content) < 1000
    assert unkeyed.headers["x-request-id"].startswith("req-")
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": True}
    stream = httpx.post(f"{smollm2_server.v1}/completions", json=body, headers={**auth, "X-Request-Id": big},
                        timeout=120)
    assert stream.status_code == 200 and len(stream.content) < 10_000 and big not in stream.text
    for path in ("/v1/models", "/tokenize", "/load"):
        response = httpx.request("OPTIONS", f"{smollm2_server.base}{path}", timeout=30)
        assert response.status_code == 401, f"OPTIONS {path}: {response.status_code}"


def test_deeply_nested_json_with_a_rope_set_is_400(smollm2_server):
    nested = '{"model": "smollm2", "rope_set": "short", "prompt": ' + "[" * 50_000 + "]" * 50_000 + "}"
    response = httpx.post(f"{smollm2_server.v1}/completions", content=nested.encode(), timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"


def running_requests(server) -> float:
    text = urllib.request.urlopen(f"{server.base}/metrics", timeout=5).read().decode()
    values = [float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M)]
    assert values, "vllm:num_requests_running missing from /metrics"
    return sum(values)


def test_disconnect_mid_stream_aborts_the_engine_request(smollm2_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story about a whale."}],
            "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{smollm2_server.v1}/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert running_requests(smollm2_server) >= 1
    deadline = time.time() + 30
    while running_requests(smollm2_server) > 0:
        assert time.time() < deadline, "engine still running the request after the client left"
        time.sleep(0.5)


def test_32_concurrent_streams_complete(client, make_aclient):
    """32 streams at once each give the greedy answer its prompt gets alone, token for token up to the first
    step whose two best tokens lie within 1e-3 nats (where batching may flip a tie), and finish."""
    def prompt(i: int) -> list[dict]:
        return [{"role": "user", "content": f"Say a number above {i}."}]

    async def one(aclient, i: int) -> tuple[list[str], str | None]:
        stream = await aclient.chat.completions.create(model=MODEL, messages=prompt(i), max_tokens=8, temperature=0,
                                                       stream=True, logprobs=True)
        tokens, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                choice = chunk.choices[0]
                tokens += [t.token for t in choice.logprobs.content or []] if choice.logprobs else []
                finish = choice.finish_reason or finish
        return tokens, finish

    async def run():
        aclient = make_aclient()
        return await asyncio.gather(*(one(aclient, i) for i in range(32)))

    results = asyncio.run(run())
    assert len(results) == 32
    for i, (tokens, finish) in enumerate(results):
        assert finish in ("stop", "length") and tokens, (i, finish, tokens)
        alone = client.chat.completions.create(model=MODEL, messages=prompt(i), max_tokens=8, temperature=0,
                                               logprobs=True, top_logprobs=2).choices[0].logprobs.content
        for step, (streamed, expected) in enumerate(zip(tokens, alone)):
            best, second = (t.logprob for t in expected.top_logprobs[:2])
            if best - second < 1e-3:
                break
            assert streamed == expected.token, f"prompt {i}, step {step}: {streamed!r} != {expected.token!r}"
        else:
            assert len(tokens) == len(alone), (i, tokens, [t.token for t in alone])
