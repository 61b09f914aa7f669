"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.errors import bad_request
from server.protocol import ChatCompletionRequest
from server.routes.generate import check_request, respond

router = APIRouter()


def chat_prompt_ids(tokenizer, body: ChatCompletionRequest) -> list[int]:
    """The chat template applied to the messages: what the model sees, and what the regime rule counts."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    except Exception as exc:  # noqa: BLE001 - a template that rejects the conversation is the client's 400
        raise bad_request(f"messages could not be rendered with the chat template: {exc}", param="messages")
    return list(encoded["input_ids"])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    model = check_request(request, body)
    return await respond(request, body, "chat", chat_prompt_ids(model.tokenizer, body), None)
