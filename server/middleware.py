"""What `longrope serve` adds around vLLM's OpenAI app, as one pure ASGI middleware.

- ``X-Request-Id``: the client's when it is a short token, else a new one; passed on to vLLM (which
  names its engine requests after it) and returned on every response.
- Every request's body is read here first, counted as it arrives, on every route (under any
  ``--root-path``): 413 past ``--max-body-bytes``, 408 when it arrives slower than
  ``--max-body-seconds``; then the app reads it from memory.
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

import asyncio
import json
import re
import sys
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
# An X-Request-Id kept as the client sent it: at most 128 characters of these; any other is replaced.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
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
        args = state.args
        headers = MutableHeaders(scope=scope)
        request_id = request_id_of(headers.get("x-request-id"))
        headers["x-request-id"] = request_id  # vLLM names the engine request after it
        path, method = route_path(scope), scope["method"]
        client = getattr(state, "engine_client", None)
        metrics = getattr(client, "metrics", None)

        async def send_error(status: int, message: str) -> None:
            data = json.dumps(openai_error(status, {"error": message}), separators=(",", ":")).encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(data)).encode()),
                                    (b"x-request-id", request_id.encode())]})
            await send({"type": "http.response.body", "body": data})
            self._count(metrics, scope, method, status)

        if not self.guard_built:
            self.guard, self.guard_built = ApiKeyGuard.from_args(args), True
        if self.guard is not None and not self.guard.allows(scope, path):
            await send_error(401, API_KEY_MESSAGE)
            return
        try:
            body = await read_body(receive, headers.get("content-length"), args.max_body_bytes, args.max_body_seconds)
        except BodyRefused as refused:
            await send_error(refused.status, str(refused))
            return
        if method == "POST" and path in GENERATION_PATHS:
            try:
                body = _rope_set_into_xargs(body)
            except RecursionError:
                await send_error(400, f"The request body nests JSON deeper than this server parses "
                                      f"({sys.getrecursionlimit()} levels).")
                return
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


def request_id_of(given: str | None) -> str:
    """The client's ``X-Request-Id`` when it is a short token (REQUEST_ID), else a new one: vLLM repeats the
    id in every stream chunk and names engine requests after it, and we echo it in every response."""
    if given is not None and REQUEST_ID.fullmatch(given):
        return given
    return f"req-{uuid.uuid4().hex}"


def route_path(scope: Scope) -> str:
    """The request's path inside the app, whatever ``--root-path`` it is served under."""
    root = scope.get("root_path", "")
    path = scope["path"]
    return path[len(root):] or "/" if root and path.startswith(root) else path


class BodyRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_body(receive: Receive, length: str | None, limit: int, seconds: float) -> bytes:
    """The whole request body, counted as it arrives (sized or chunked): 413 past ``limit`` bytes, 408 when
    it takes longer than ``seconds`` to arrive. A ``Content-Length`` over the limit is refused unread."""
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyRefused(413, f"Request body of {length} bytes exceeds the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(seconds):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break  # the client left; the app sees the same disconnect
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise BodyRefused(413, f"Request body exceeds the limit of {limit} bytes.")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise BodyRefused(408, f"The request body did not arrive within {seconds:g} seconds.") from None
    return b"".join(chunks)


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
