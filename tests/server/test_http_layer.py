"""The HTTP layer alone, over stand-in engines (fast); the real engine is proven in the other files."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from rope_ext.tiny_model import tiny_ladder
from server.app import create_app
from server.settings import ServerSettings

QUESTION = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class LoadingModel:
    """A model whose engine has not started yet."""

    engine = None
    start_error = None
    ladder = None
    max_model_len = 0
    ready = False

    async def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class BrokenEngine:
    errored = False

    async def generate(self, *args, **kwargs):
        raise RuntimeError("secret internal detail")
        yield  # pragma: no cover - makes this an async generator

    async def abort(self, request_id: str) -> None:
        pass


class BrokenModel(LoadingModel):
    ready = True
    engine = BrokenEngine()

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ladder = tiny_ladder()
        self.max_model_len = 1024


def client_for(model, **settings) -> TestClient:
    return TestClient(create_app(ServerSettings(served_model_name="m", **settings), model), raise_server_exceptions=False)


def test_health_is_503_while_loading_and_requests_are_refused():
    with client_for(LoadingModel()) as client:
        assert client.get("/health").status_code == 503
        response = client.post("/v1/chat/completions", json=QUESTION)
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "service_unavailable"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_engine_failure_is_500_with_request_id_and_no_traceback(tokenizer):
    with client_for(BrokenModel(tokenizer)) as client:
        response = client.post("/v1/chat/completions", json=QUESTION, headers={"X-Request-Id": "abc-123"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "abc-123" in error["message"]
    assert "secret internal detail" not in response.text and "Traceback" not in response.text
    assert response.headers["x-request-id"] == "abc-123"


def test_malformed_json_is_400(tokenizer):
    with client_for(BrokenModel(tokenizer)) as client:
        response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_every_response_gets_a_request_id(tokenizer):
    with client_for(BrokenModel(tokenizer)) as client:
        assert client.get("/v1/models").headers["x-request-id"].startswith("req-")


def test_openapi_matches_the_accepted_requests(tokenizer):
    with client_for(BrokenModel(tokenizer)) as client:
        spec = client.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/version", "/metrics"} <= set(spec["paths"])
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert {"messages", "model", "rope_set", "max_completion_tokens", "response_format"} <= set(chat["properties"])
    assert chat["additionalProperties"] is False
