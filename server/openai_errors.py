"""Every error `longrope serve` answers, as OpenAI's error object with OpenAI's types and string codes.

``{"error": {"message", "type", "param", "code"}}``: vLLM's own bodies (``ErrorResponse``, whose
code is the HTTP status), FastAPI's ``{"detail": ...}`` and ours all leave in this shape. The code
comes from the refusal that caused the error when there is one (``rope_ext.protocol``), else from
the fields vLLM set (status, type, param), never from the message text.
"""

from __future__ import annotations

import json
from typing import Any

from rope_ext.protocol import Refusal

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error",
               503: "service_unavailable"}
ERROR_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
               408: "request_timeout",
               413: "request_too_large", 422: "invalid_request", 429: "rate_limit_exceeded", 500: "internal_error",
               501: "not_implemented", 503: "service_unavailable"}
# A longer message is cut: errors echo client values (a model name, a field), which may be megabytes.
MAX_MESSAGE = 1000
# vLLM's own refusals of a prompt longer than the model's context carry these params.
PROMPT_TOO_LONG_PARAMS = ("input_tokens", "input_text")
VLLM_NOT_FOUND = "NotFoundError"  # vLLM's type for a model (or LoRA adapter) that is not served


def openai_error(status: int, body: Any, refusal: Refusal | None = None) -> dict[str, Any]:
    """``body``, an error answered with ``status``, as OpenAI's error object."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message, param, code, vllm_type = str(error.get("message", "")), error.get("param"), error.get("code"), \
            error.get("type")
    else:
        detail = error if error is not None else (body.get("detail") if isinstance(body, dict) else body)
        message, param, code, vllm_type = (detail if isinstance(detail, str) else json.dumps(detail)), None, None, None
    if refusal is not None:
        code, param = refusal.code, refusal.param
    elif not isinstance(code, str):
        code = _code(status, vllm_type, param)
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if len(message) > MAX_MESSAGE:
        message = f"{message[:MAX_MESSAGE]}… ({len(message) - MAX_MESSAGE} characters cut)"
    if isinstance(param, str) and len(param) > MAX_MESSAGE:
        param = param[:MAX_MESSAGE]
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _code(status: int, vllm_type: str | None, param: str | None) -> str:
    if status == 400 and param in PROMPT_TOO_LONG_PARAMS:
        return "context_length_exceeded"
    if status == 404 and vllm_type == VLLM_NOT_FOUND:
        return "model_not_found"
    return ERROR_CODES.get(status, "error")
