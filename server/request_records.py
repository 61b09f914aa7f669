"""What the front end learns about each HTTP request while vLLM's app serves it, keyed by its request id.

vLLM's OpenAI app stands between our middleware and our engine client: the middleware sees the HTTP
request and response, the engine client sees ``generate`` calls. They meet here. The middleware opens a
record under the request's id (``X-Request-Id``, unique among the requests in flight) and names it in the
body's ``vllm_xargs`` (HTTP_REQUEST_KEY), which vLLM hands to ``generate`` as ``SamplingParams.extra_args``:
vLLM's own per-request channel from a request body to the engine. The engine client adds what it admitted
(one ChoiceRun per choice) or the refusal it raised; the middleware reads them for the ``x-rope-*``
headers, the per-choice fields and the error's code, and closes the record when the response is sent.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from rope_ext.protocol import Refusal
from server.choices import ChoiceRun

HTTP_REQUEST_KEY = "longrope_http_request"  # in vllm_xargs / extra_args: the id of the record to fill


@dataclass
class RequestRecord:
    runs: list[ChoiceRun] = field(default_factory=list)  # every choice admitted, in order (each prompt's choices)
    refusal: Refusal | None = None  # the first refusal raised while serving it


class RequestRecords:
    """The records of the HTTP requests being served (owned by the engine client, opened by the middleware)."""

    def __init__(self) -> None:
        self._open: dict[str, RequestRecord] = {}

    def open(self, request_id: str) -> tuple[str, RequestRecord]:
        """A record for a new HTTP request: under ``request_id``, or a new id when one in flight has it."""
        if request_id in self._open:
            request_id = f"req-{uuid.uuid4().hex}"
        record = self._open[request_id] = RequestRecord()
        return request_id, record

    def close(self, request_id: str) -> None:
        self._open.pop(request_id, None)

    def of(self, extra_args: dict[str, Any] | None) -> RequestRecord | None:
        """The record a ``generate`` call belongs to, from its extra_args (None for a call with none open)."""
        request_id = (extra_args or {}).get(HTTP_REQUEST_KEY)
        return self._open.get(request_id) if isinstance(request_id, str) else None
