"""POST /v1/completions (legacy text completions; max_tokens defaults to 16 as in OpenAI's API)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.protocol import CompletionRequest
from server.routes.generate import check_request, respond

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    model = check_request(request, body)
    if isinstance(body.prompt, str):
        prompt_ids = list(model.tokenizer(body.prompt)["input_ids"])
    else:
        prompt_ids = list(body.prompt)
    return await respond(request, body, "completion", prompt_ids, 16)
