"""What `longrope serve` changes in vLLM's responses, on their way out: the ladder's headers and per-choice
fields, the sets in ``/v1/models``, and OpenAI's error object for every error, vLLM's own included.

The facts come from the request's record (server.request_records): the choices the engine client admitted
and a refusal it raised. A JSON body that needs a change is held until complete, parsed once, changed and
sent whole. A stream (vLLM's Server-Sent Events: ``data: <JSON>`` events ended by a blank line, the last
``data: [DONE]``) is passed on event by event: bytes are held only until an event is complete (an event may
be split across ASGI messages), and only a ``data:`` event that finishes a choice or carries an error is
changed.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import Message, Send

from server.choices import ChoiceRun
from server.openai_errors import openai_error
from server.request_records import RequestRecord

CHOICE_PATHS = ("/v1/chat/completions", "/v1/completions")  # responses whose choices get rope_set fields
MODELS_PATH = "/v1/models"
EVENT_END = b"\n\n"


def _compact(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def choice_fields(run: ChoiceRun) -> dict[str, Any]:
    return {"rope_set": run.final_set, "rope_promotions": [p.as_dict() for p in run.promotions]}


def with_choice_fields(payload: Any, runs: list[ChoiceRun]) -> bool:
    """Add the fields to every finished choice of ``payload``; whether any was added."""
    changed = False
    choices = payload.get("choices") if isinstance(payload, dict) else None
    for choice in choices if isinstance(choices, list) else []:
        index = choice.get("index", 0) if isinstance(choice, dict) else None
        if isinstance(index, int) and 0 <= index < len(runs) and choice.get("finish_reason") is not None:
            choice.update(choice_fields(runs[index]))
            changed = True
    return changed


class ResponseRewriter:
    """The ``send`` vLLM's app answers through: headers, per-choice fields, error shapes."""

    def __init__(self, send: Send, request_id: str, path: str, record: RequestRecord, ladder: Any):
        self.send, self.request_id, self.path, self.record, self.ladder = send, request_id, path, record, ladder
        self.status = 500
        self.mode = "pass"  # pass | json (rewrite a whole body) | sse (rewrite finishing events)
        self.start: Message | None = None
        self.held: list[bytes] = []  # json: the body so far; sse: the bytes of an event not yet complete
        self.error_code: str | None = None  # the code of the error sent, once sent

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            await self._start(message)
        elif message["type"] != "http.response.body" or self.mode == "pass":
            await self.send(message)
        elif self.mode == "sse":
            await self._sse(message)
        else:
            await self._json(message)

    async def _start(self, message: Message) -> None:
        self.status = message["status"]
        headers = MutableHeaders(scope=message)
        headers["x-request-id"] = self.request_id
        runs = self.record.runs
        if runs:
            headers["x-rope-set"] = runs[0].final_set
            headers["x-rope-promotions"] = ", ".join(f"{p.from_set}->{p.to_set}@{p.at_tokens}"
                                                     for p in runs[0].promotions)
        content_type = headers.get("content-type", "")
        if self.status >= 400 and content_type.startswith(("application/json", "text/plain")):
            self.mode = "json"
        elif content_type.startswith("application/json") and (self.path in CHOICE_PATHS and runs
                                                               or self.path == MODELS_PATH):
            self.mode = "json"
        elif content_type.startswith("text/event-stream") and runs:
            self.mode = "sse"
        if self.mode == "json":
            self.start = message  # sent with the rewritten body: its length changes
            return
        await self.send(message)

    async def _json(self, message: Message) -> None:
        self.held.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        data = self._rewritten(b"".join(self.held))
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
            payload = openai_error(self.status, payload, self.record.refusal)
            self.error_code = payload["error"]["code"]
        elif self.path == MODELS_PATH:
            for entry in payload.get("data", []) if isinstance(payload, dict) else []:
                entry["rope_sets"] = [{"name": fs.name, "window": fs.window} for fs in self.ladder.sets]
        else:
            with_choice_fields(payload, self.record.runs)
        return _compact(payload)

    async def _sse(self, message: Message) -> None:
        """Pass on every complete event (changed where it finishes a choice or is an error); hold the rest."""
        self.held.append(message.get("body", b""))
        pending = b"".join(self.held)
        more = message.get("more_body", False)
        complete, _, rest = pending.rpartition(EVENT_END) if more else (pending, b"", b"")
        self.held = [rest] if rest else []
        if complete or not more:
            out = EVENT_END.join(self._event(event) for event in complete.split(EVENT_END))
            await self.send({"type": "http.response.body", "body": out + (EVENT_END if more else b""),
                             "more_body": more})

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: {"):
            return event
        try:
            payload = json.loads(event[6:])
        except ValueError:
            return event
        if isinstance(payload, dict) and "error" in payload and "choices" not in payload:
            error = payload["error"]
            status = error.get("code") if isinstance(error, dict) and isinstance(error.get("code"), int) else 500
            return b"data: " + _compact(openai_error(status, payload, self.record.refusal))
        if with_choice_fields(payload, self.record.runs):
            return b"data: " + _compact(payload)
        return event
