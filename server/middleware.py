"""What `longrope serve` adds around vLLM's OpenAI app, as one pure ASGI middleware.

- ``X-Request-Id``: the client's, else a new one; passed on to vLLM (which names its engine
  requests after it) and returned on every response.
- A body-size limit: larger request bodies get 413 before anything parses them.
- ``rope_set`` as a top-level request field: moved into ``vllm_xargs`` (vLLM ignores unknown
  top-level fields; ``vllm_xargs`` reaches the engine client as ``extra_args``).
- The ladder: ``x-rope-set`` / ``x-rope-promotions`` headers, per-choice ``rope_set`` and
  ``rope_promotions`` fields, the sets in ``/v1/models``.
- OpenAI-shaped errors for every error, vLLM's own included (``server.openai_errors``).
- The API key on every route but the probes (``server.api_keys``).

It reads what it needs from the app's state (``engine_client`` is our
``server.engine_client.LadderEngineClient``, ``args`` the parsed flags), so vLLM's own
``--middleware`` mechanism installs it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rope_ext.protocol import ROPE_SET_KEY, Refusal, refusals
from server.api_keys import MESSAGE as API_KEY_MESSAGE
from server.api_keys import ApiKeyGuard
from server.choice_runs import ChoiceRun, current_choices
from server.openai_errors import openai_error

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
CHOICE_PATHS = ("/v1/chat/completions", "/v1/completions")


def _choice_fields(run: ChoiceRun) -> dict[str, Any]:
    return {"rope_set": run.final_set, "rope_promotions": [p.as_dict() for p in run.promotions]}


def _with_choice_fields(payload: dict[str, Any], runs: list[ChoiceRun]) -> dict[str, Any]:
    for choice in payload.get("choices") or []:
        index = choice.get("index", 0)
        if index < len(runs) and choice.get("finish_reason") is not None:
            choice.update(_choice_fields(runs[index]))
    return payload


class LongRopeMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app
        self.guard: ApiKeyGuard | None = None  # built from the app's flags on the first request
        self.guard_built = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        limit: int = state.args.max_body_bytes
        headers = MutableHeaders(scope=scope)
        request_id = headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
        headers["x-request-id"] = request_id  # vLLM names the engine request after it
        path, method = scope["path"], scope["method"]
        client = getattr(state, "engine_client", None)
        metrics = getattr(client, "metrics", None)

        async def send_error(status: int, body: dict) -> None:
            data = json.dumps(openai_error(status, body), separators=(",", ":")).encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(data)).encode()),
                                    (b"x-request-id", request_id.encode())]})
            await send({"type": "http.response.body", "body": data})

        if not self.guard_built:
            self.guard, self.guard_built = ApiKeyGuard.from_args(state.args), True
        if self.guard is not None and not self.guard.allows(scope):
            await send_error(401, {"error": API_KEY_MESSAGE})
            self._count(metrics, scope, method, 401)
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await send_error(413, {"error": f"Request body of {length} bytes exceeds the limit of {limit} bytes."})
            self._count(metrics, scope, method, 413)
            return
        if method == "POST" and path in GENERATION_PATHS:
            body = b""
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                body += message.get("body", b"")
                if len(body) > limit:
                    await send_error(413, {"error": f"Request body exceeds the limit of {limit} bytes."})
                    self._count(metrics, scope, method, 413)
                    return
                if not message.get("more_body", False):
                    break
            body = _rope_set_into_xargs(body)
            headers["content-length"] = str(len(body))
            receive = _replaying(body, receive)
        runs: list[ChoiceRun] = []
        refused: list[Refusal] = []
        tokens = current_choices.set(runs), refusals.set(refused)
        sender = _ResponseRewriter(send, request_id, path, runs, refused, client)
        try:
            await self.app(scope, receive, sender)
        finally:
            current_choices.reset(tokens[0])
            refusals.reset(tokens[1])
            self._count(metrics, scope, method, sender.status)
            if metrics is not None and sender.context_refused:
                metrics.refused.labels(metrics.model).inc()

    @staticmethod
    def _count(metrics: Any, scope: Scope, method: str, status: int) -> None:
        if metrics is not None:
            route = scope.get("route")
            metrics.http.labels(getattr(route, "path", "unmatched"), method, str(status)).inc()


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then the client's own messages (its disconnect)."""
    replayed = False

    async def receive_body() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_body


def _rope_set_into_xargs(body: bytes) -> bytes:
    """``{"rope_set": X}`` -> ``{"vllm_xargs": {"rope_set": X}}``; other bodies untouched (no parse)."""
    if f'"{ROPE_SET_KEY}"'.encode() not in body:
        return body
    try:
        payload = json.loads(body)
    except ValueError:
        return body  # vLLM reports the malformed JSON
    if not isinstance(payload, dict) or ROPE_SET_KEY not in payload:
        return body
    xargs = payload.get("vllm_xargs") or {}
    if isinstance(xargs, dict):
        payload["vllm_xargs"] = {**xargs, ROPE_SET_KEY: payload.pop(ROPE_SET_KEY)}
    return json.dumps(payload, separators=(",", ":")).encode()


class _ResponseRewriter:
    """The ``send`` that adds our headers and fields and reshapes error bodies."""

    def __init__(self, send: Send, request_id: str, path: str, runs: list[ChoiceRun], refused: list[Refusal],
                 client: Any):
        self.send, self.request_id, self.path, self.runs, self.client = send, request_id, path, runs, client
        self.refused = refused  # refusals raised while this request was served: their codes win
        self.status = 500
        self.start: Message | None = None
        self.mode = "pass"  # pass | buffer (rewrite a whole JSON body) | sse (rewrite finishing chunks)
        self.chunks: list[bytes] = []
        self.context_refused = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = MutableHeaders(scope=message)
            headers["x-request-id"] = self.request_id
            if self.runs:
                headers["x-rope-set"] = self.runs[0].final_set
                headers["x-rope-promotions"] = ", ".join(
                    f"{p.from_set}->{p.to_set}@{p.at_tokens}" for p in self.runs[0].promotions)
            content_type = headers.get("content-type", "")
            if content_type.startswith("application/json") and (
                    self.status >= 400 or self.path in CHOICE_PATHS and self.runs or self.path == "/v1/models"):
                self.mode = "buffer"
            elif self.status >= 400 and content_type.startswith("text/plain"):
                self.mode = "buffer"
            elif content_type.startswith("text/event-stream") and self.runs:
                self.mode = "sse"
            if self.mode == "buffer":
                self.start = message
                return
            await self.send(message)
            return
        if message["type"] != "http.response.body" or self.mode == "pass":
            await self.send(message)
            return
        if self.mode == "sse":
            message["body"] = self._sse(message.get("body", b""))
            await self.send(message)
            return
        self.chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        data = self._rewritten(b"".join(self.chunks))
        assert self.start is not None
        headers = MutableHeaders(scope=self.start)
        headers["content-length"] = str(len(data))
        if self.status >= 400:
            headers["content-type"] = "application/json"
        await self.send(self.start)
        await self.send({"type": "http.response.body", "body": data})

    def _rewritten(self, data: bytes) -> bytes:
        try:
            payload = json.loads(data) if data else {}
        except ValueError:
            payload = data.decode(errors="replace")
        if self.status >= 400:
            payload = openai_error(self.status, payload, self.refused[0] if self.refused else None)
            self.context_refused = payload["error"]["code"] == "context_length_exceeded"
        elif self.path == "/v1/models":
            ladder = self.client.ladder
            for entry in payload.get("data", []):
                entry["rope_sets"] = [{"name": fs.name, "window": fs.window} for fs in ladder.sets]
        else:
            payload = _with_choice_fields(payload, self.runs)
        return json.dumps(payload, separators=(",", ":")).encode()

    def _sse(self, data: bytes) -> bytes:
        """Chunks that finish a choice get its set and promotions; in-band errors get our shape."""
        if b'"finish_reason":"' not in data and b'"error"' not in data:
            return data
        out = []
        for event in data.split(b"\n\n"):
            if event.startswith(b"data: {"):
                payload = json.loads(event[6:])
                if "error" in payload and "choices" not in payload:
                    error = payload["error"]
                    payload = openai_error(error.get("code") if isinstance(error.get("code"), int) else 500, payload)
                else:
                    payload = _with_choice_fields(payload, self.runs)
                event = b"data: " + json.dumps(payload, separators=(",", ":")).encode()
            out.append(event)
        return b"\n\n".join(out)
