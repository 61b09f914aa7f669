"""What `longrope serve` adds around vLLM's OpenAI app, as one pure ASGI middleware.

- ``X-Request-Id``: the client's when it is a short token, else a new one; passed on to vLLM (which
  names its engine requests after it) and returned on every response.
- Every request's body is read here first, counted as it arrives, on every route (under any
  ``--root-path``): 413 past ``--max-body-bytes``, 408 when it arrives slower than
  ``--max-body-seconds``; then the app reads it from memory.
- A generation request's body names its record (``server.request_records``) in ``vllm_xargs``, and a
  top-level ``rope_set`` moves there too.
- On the way out (``server.responses``): the ``x-rope-set`` / ``x-rope-promotions`` headers, per-choice
  ``rope_set`` and ``rope_promotions`` fields, the sets in ``/v1/models``, OpenAI-shaped errors for every
  error, vLLM's own included (``server.openai_errors``).
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

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rope_ext.protocol import ROPE_SET_KEY
from server.api_keys import MESSAGE as API_KEY_MESSAGE
from server.api_keys import ApiKeyGuard
from server.openai_errors import openai_error
from server.request_records import HTTP_REQUEST_KEY, RequestRecord, RequestRecords
from server.responses import ResponseRewriter

# The routes whose requests reach the engine client's generate with vllm_xargs (each has the field).
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
# An X-Request-Id kept as the client sent it: at most 128 characters of these; any other is replaced.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


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
        client = getattr(state, "engine_client", None)
        metrics = getattr(client, "metrics", None)
        records = getattr(client, "records", None) or RequestRecords()
        request_id, record = records.open(request_id_of(scope))
        try:
            await self._serve(scope, receive, send, request_id, record, args, client, metrics)
        finally:
            records.close(request_id)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, request_id: str, record: RequestRecord,
                     args: Any, client: Any, metrics: Any) -> None:
        headers = MutableHeaders(scope=scope)
        headers["x-request-id"] = request_id  # vLLM names the engine request after it
        path, method = route_path(scope), scope["method"]

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
                body = _for_the_engine_client(body, request_id)
            except RecursionError:
                await send_error(400, f"The request body nests JSON deeper than this server parses "
                                      f"({sys.getrecursionlimit()} levels).")
                return
        headers["content-length"] = str(len(body))
        sender = ResponseRewriter(send, request_id, path, record, getattr(client, "ladder", None))
        try:
            await self.app(scope, _replaying(body, receive), sender)
        finally:
            self._count(metrics, scope, method, sender.status)
            if metrics is not None and sender.error_code == "context_length_exceeded":
                metrics.refused.labels(metrics.model).inc()

    @staticmethod
    def _count(metrics: Any, scope: Scope, method: str, status: int) -> None:
        if metrics is not None:
            route = scope.get("route")
            metrics.http.labels(getattr(route, "path", "unmatched"), method, str(status)).inc()


def request_id_of(scope: Scope) -> str:
    """The client's ``X-Request-Id`` when it is a short token (REQUEST_ID), else a new one: vLLM repeats the
    id in every stream chunk and names engine requests after it, and we echo it in every response."""
    given = Headers(scope=scope).get("x-request-id")
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


def _for_the_engine_client(body: bytes, request_id: str) -> bytes:
    """A generation request's JSON body with its record named in ``vllm_xargs`` (server.request_records) and a
    top-level ``rope_set`` moved there too (vLLM ignores unknown top-level fields; ``vllm_xargs`` reaches the
    engine client as ``extra_args``). A body that is not a JSON object is left for vLLM to refuse."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if not isinstance(payload, dict):
        return body
    xargs = payload.get("vllm_xargs") or {}
    if not isinstance(xargs, dict):
        return body
    if ROPE_SET_KEY in payload:
        xargs[ROPE_SET_KEY] = payload.pop(ROPE_SET_KEY)
    payload["vllm_xargs"] = {**xargs, HTTP_REQUEST_KEY: request_id}
    return json.dumps(payload, separators=(",", ":")).encode()
