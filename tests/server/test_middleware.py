"""server.middleware alone, over a small FastAPI app and stand-in engine client state (fast).

The real app (vLLM's, over a real engine) is proven in the other files; these pin the
middleware's own rules, including cases a real engine rarely shows (a stream's in-band error).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from rope_ext.models.tiny import tiny_ladder
from rope_ext.protocol import UnknownSet, vllm_error
from server.choices import ChoiceRun, Promotion
from server.metrics import ServerMetrics
from server.middleware import LongRopeMiddleware
from server.openai_errors import openai_error
from server.request_records import HTTP_REQUEST_KEY, RequestRecords

pytestmark = pytest.mark.unit

LIMIT = 1000


def app_with_routes() -> FastAPI:
    app = FastAPI()
    app.state.args = SimpleNamespace(max_body_bytes=LIMIT, max_body_seconds=5.0, api_key=None,
                                     metrics_require_api_key=False)
    app.state.engine_client = SimpleNamespace(ladder=tiny_ladder(), metrics=ServerMetrics("m"),
                                              records=RequestRecords())

    def admitted(body: dict) -> list[ChoiceRun]:
        """What the engine client does when vLLM's serving layer calls generate (vllm_xargs become extra_args)."""
        run = ChoiceRun("short", 300, promotions=[Promotion("short", "mid", 256)])
        app.state.engine_client.records.of(body.get("vllm_xargs")).runs.append(run)
        return [run]

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        admitted(body)
        if body.get("stream"):
            async def events():
                yield 'data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}\n\n'
                yield 'data: {"choices":[{"index":0,"text":"b","finish_reason":"length"}]}\n\n'
                yield 'data: {"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}\n\n'
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"seen": body, "request_id": request.headers["x-request-id"],
                "choices": [{"index": 0, "text": "ab", "finish_reason": "length"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return {"bytes": len(await request.body())}

    @app.api_route("/metrics", methods=["GET", "OPTIONS"])
    async def metrics():
        return {"series": "secret"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "m", "object": "model"}]}

    @app.get("/v1/unauthorized")
    async def unauthorized():
        return JSONResponse({"error": "Unauthorized"}, status_code=401)

    @app.get("/v1/too-long")
    async def too_long():
        return JSONResponse({"error": {"message": "This model's maximum context length is 1024 tokens.",
                                       "type": "BadRequestError", "param": "input_tokens", "code": 400}},
                            status_code=400)

    @app.post("/v1/chat/completions")
    async def refused(request: Request):
        """What vLLM's serving layer answers when the engine client raises a refusal."""
        refusal = UnknownSet("no factor set named 'x'")
        app.state.engine_client.records.of((await request.json()).get("vllm_xargs")).refusal = refusal
        error = vllm_error(refusal)
        return JSONResponse({"error": {"message": str(error), "type": "BadRequestError", "param": error.parameter,
                                       "code": 400}}, status_code=400)

    app.add_middleware(LongRopeMiddleware)
    return app


def client(app: FastAPI | None = None) -> TestClient:
    return TestClient(app or app_with_routes())


def test_request_id_is_kept_or_made_and_passed_to_the_app():
    with client() as c:
        mine = c.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "abc-123"})
        made = c.post("/v1/completions", json={"prompt": "x"})
    assert mine.headers["x-request-id"] == "abc-123" == mine.json()["request_id"]
    assert made.headers["x-request-id"].startswith("req-") and made.json()["request_id"] == made.headers["x-request-id"]


def test_top_level_rope_set_becomes_vllm_xargs_beside_the_record():
    with client() as c:
        body = {"prompt": "x", "rope_set": "long", "vllm_xargs": {"a": 1}}
        response = c.post("/v1/completions", json=body, headers={"X-Request-Id": "mine"})
    seen = response.json()["seen"]
    assert "rope_set" not in seen and seen["vllm_xargs"] == {"a": 1, "rope_set": "long", HTTP_REQUEST_KEY: "mine"}


def test_body_over_the_limit_is_413_before_the_app_reads_it():
    with client() as c:
        response = c.post("/v1/completions", json={"prompt": "x" * 2 * LIMIT})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large" and response.headers["x-request-id"]


def _chunked(size: int):
    """A body sent in 100-byte chunks with no Content-Length (Transfer-Encoding: chunked)."""
    for start in range(0, size, 100):
        yield b"x" * min(100, size - start)


@pytest.mark.parametrize("path", ["/tokenize", "/v1/completions", "/nowhere"])
@pytest.mark.parametrize("sized", [True, False])
def test_every_route_counts_its_body_sized_or_chunked(path, sized):
    with client() as c:
        over = c.post(path, content=b"x" * (LIMIT + 1) if sized else _chunked(LIMIT + 1))
        under = c.post("/tokenize", content=b"x" * LIMIT if sized else _chunked(LIMIT))
    assert over.status_code == 413 and over.json()["error"]["code"] == "request_too_large"
    assert under.status_code == 200 and under.json() == {"bytes": LIMIT}


def test_the_limit_and_rope_set_hold_under_a_root_path():
    with TestClient(app_with_routes(), root_path="/api") as c:
        over = c.post("/api/tokenize", content=_chunked(LIMIT + 1))
        seen = c.post("/api/v1/completions", json={"prompt": "x", "rope_set": "long"}).json()["seen"]
    assert over.status_code == 413
    assert seen["vllm_xargs"]["rope_set"] == "long"


def test_a_body_that_drips_slower_than_the_limit_is_408():
    """A client that sends a byte and then nothing holds no slot past --max-body-seconds."""
    import asyncio

    app = app_with_routes()
    app.state.args.max_body_seconds = 0.2
    sent: list[dict] = []

    async def receive():
        if not sent:
            sent.append({})
            return {"type": "http.request", "body": b"{", "more_body": True}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "", "headers": [],
             "query_string": b"", "app": app, "state": {}}
    asyncio.run(asyncio.wait_for(LongRopeMiddleware(app)(scope, receive, send), timeout=5))
    assert sent[1]["status"] == 408
    assert json.loads(sent[2]["body"])["error"]["code"] == "request_timeout"


@pytest.mark.parametrize("given,kept", [("abc-123", True), ("a" * 200_000, False), ("two words", False),
                                        ("x\r\nSet-Cookie: y", False), ("0f8fad5b-d9cb-469f-a165-70867728950e", True)])
def test_request_ids_are_bounded_in_length_and_characters(given, kept):
    with client() as c:
        response = c.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": given})
    rid = response.headers["x-request-id"]
    assert (rid == given) is kept and len(rid) <= 128 and response.json()["request_id"] == rid


def test_options_needs_the_key_unless_it_is_a_cors_preflight():
    """Under --metrics-require-api-key, OPTIONS /metrics once answered the metrics without the key."""
    app = app_with_routes()
    app.state.args.api_key, app.state.args.metrics_require_api_key = ["k"], True
    with client(app) as c:
        plain = c.options("/metrics")
        keyed = c.options("/metrics", headers={"Authorization": "Bearer k"})
        preflight = c.options("/v1/completions",
                              headers={"Origin": "http://x", "Access-Control-Request-Method": "POST"})
    assert plain.status_code == 401 and "secret" not in plain.text
    assert keyed.status_code == 200
    assert preflight.status_code != 401


def test_deeply_nested_json_is_400_not_500():
    app = app_with_routes()
    app.state.args.max_body_bytes = 1_000_000
    with client(app) as c:
        body = '{"rope_set": "long", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
        response = c.post("/v1/completions", content=body.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"


def test_headers_and_choice_fields_name_the_set():
    with client() as c:
        response = c.post("/v1/completions", json={"prompt": "x"})
    assert response.headers["x-rope-set"] == "mid" and response.headers["x-rope-promotions"] == "short->mid@256"
    choice = response.json()["choices"][0]
    assert choice["rope_set"] == "mid"
    assert choice["rope_promotions"] == [{"from": "short", "to": "mid", "at_tokens": 256}]
    assert int(response.headers["content-length"]) == len(response.content)


def test_stream_finishing_chunk_gets_the_fields_and_errors_get_our_shape():
    with client() as c:
        lines = [line for line in c.post("/v1/completions", json={"prompt": "x", "stream": True}).iter_lines() if line]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "rope_set" not in chunks[0]["choices"][0]
    assert chunks[1]["choices"][0]["rope_set"] == "mid"
    assert chunks[2]["error"] == {"message": "boom", "type": "server_error", "param": None, "code": "internal_error"}
    assert lines[-1] == "data: [DONE]"


def test_models_lists_the_ladder():
    with client() as c:
        entry = c.get("/v1/models").json()["data"][0]
    assert entry["rope_sets"] == [{"name": "short", "window": 256}, {"name": "mid", "window": 512},
                                  {"name": "long", "window": 1024}]


def test_every_error_is_an_openai_error_object_with_a_string_code():
    with client() as c:
        unauthorized = c.get("/v1/unauthorized").json()["error"]
        too_long = c.get("/v1/too-long").json()["error"]
        missing = c.get("/v1/nowhere")
    assert unauthorized["type"] == "authentication_error" and unauthorized["code"] == "invalid_api_key"
    assert too_long["code"] == "context_length_exceeded" and too_long["type"] == "invalid_request_error"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_a_refusal_raised_while_serving_gives_its_own_code():
    with client() as c:
        error = c.post("/v1/chat/completions", json={"messages": []}).json()["error"]
    assert error["code"] == "unknown_rope_set" and error["param"] == "rope_set"


def test_requests_in_flight_with_one_id_get_records_of_their_own():
    """Two requests sent with the same X-Request-Id at once: the second gets a new id, so neither reads the
    other's record (each response names its own choices)."""
    records = RequestRecords()
    first_id, first = records.open("same")
    second_id, second = records.open("same")
    assert first_id == "same" and second_id.startswith("req-") and first is not second
    assert records.of({HTTP_REQUEST_KEY: second_id}) is second and records.of({HTTP_REQUEST_KEY: "other"}) is None
    records.close("same")
    assert records.of({HTTP_REQUEST_KEY: "same"}) is None and records.open("same")[0] == "same"


def test_a_stream_event_split_across_messages_still_gets_its_fields():
    """ASGI body messages need not hold whole events: the finishing event arrives in three pieces."""
    import asyncio

    from server.request_records import RequestRecord
    from server.responses import ResponseRewriter

    record = RequestRecord(runs=[ChoiceRun("short", 3, promotions=[Promotion("short", "mid", 256)])])
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    rewriter = ResponseRewriter(send, "r", "/v1/completions", record, tiny_ladder())
    event = b'data: {"choices":[{"index":0,"text":"b","finish_reason":"length"}]}\n\n'
    pieces = [b'data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}\n\n' + event[:20], event[20:40],
              event[40:] + b"data: [DONE]\n\n"]

    async def stream():
        await rewriter({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
        for i, piece in enumerate(pieces):
            await rewriter({"type": "http.response.body", "body": piece, "more_body": i < len(pieces) - 1})

    asyncio.run(stream())
    body = b"".join(m.get("body", b"") for m in sent[1:])
    events = [e for e in body.split(b"\n\n") if e]
    assert [json.loads(e[6:])["choices"][0].get("rope_set") for e in events[:2]] == [None, "mid"]
    assert events[2] == b"data: [DONE]" and sent[-1]["more_body"] is False


def test_context_length_refusals_are_counted_once_each():
    app = app_with_routes()
    with client(app) as c:
        c.get("/v1/too-long")
        c.get("/v1/unauthorized")
    registry = app.state.engine_client.metrics.registry
    assert registry.get_sample_value("longrope_context_length_refusals_total", {"model": "m"}) == 1


def test_error_shapes():
    assert openai_error(503, {"error": {"message": "busy", "type": "Service Unavailable", "code": 503}})["error"] == {
        "message": "busy", "type": "service_unavailable", "param": None, "code": "service_unavailable"}
    refusal = UnknownSet("no factor set named 'x'")
    assert openai_error(400, {"error": {"message": "no factor set named 'x'", "param": "rope_set", "code": 400}},
                        refusal)["error"]["code"] == "unknown_rope_set"
    assert openai_error(400, {"error": {"message": "no factor set named 'x'", "param": "rope_set", "code": 400}}
                        )["error"]["code"] == "invalid_request"  # the code comes from the refusal, not the text
    assert openai_error(404, {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError",
                                        "code": 404}})["error"]["code"] == "model_not_found"
    assert openai_error(404, {"detail": "Not Found"})["error"]["code"] == "not_found"
    assert openai_error(500, "Internal Server Error")["error"]["type"] == "server_error"
    echoed = openai_error(404, {"error": {"message": f"The model `{'m' * 1_000_000}` does not exist.", "code": 404}})
    assert len(echoed["error"]["message"]) < 1100 and echoed["error"]["message"].endswith("characters cut)")
