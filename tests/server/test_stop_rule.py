"""Stop strings, min_tokens, include_stop_str_in_output and stop_token_ids: `longrope serve` answers exactly as
`vllm serve` does, with max_tokens (vLLM's own request, passed through) and without (a promotable choice, whose
stop strings vLLM's own detokenizer checks over the whole choice, server/promotion.py).

The same tiny weights behind both: stock `vllm serve` (plugin off) on a plain RoPE config with a 256-token
window, `longrope serve` on the same model with the tiny ladder, whose first set is plain RoPE to 256 tokens.
Every case stops well before 256 tokens (a frequent character is always among the stop strings), so both
rotate every token alike and must give the same text, finish and stop reason and usage. vLLM's own rule
once differed on the promotable path: `min_tokens` was ignored there, and a stop hit at once.
"""

from __future__ import annotations

import collections
import itertools
import json
import shutil

import httpx
import pytest

from harness.servers import vllm_serve
from tests.helpers import REPO, start_server, stop_server

pytestmark = pytest.mark.server

PROMPT = "Once upon a time"
ENGINE = ["--dtype", "float32", "--enforce-eager", "--seed", "0"]


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory):
    """(stock `vllm serve` base URL, `longrope serve` base URL) over the same weights."""
    model_dir, factors, _ = tiny_model
    plain = tmp_path_factory.mktemp("stops") / "plain"
    shutil.copytree(model_dir, plain)
    config = json.loads((plain / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    config["max_position_embeddings"] = 256
    (plain / "config.json").write_text(json.dumps(config))
    logs = plain.parent
    stock = vllm_serve(str(plain), ["--served-model-name", "m", "--max-model-len", "256", *ENGINE],
                       logs / "vllm.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"}, cwd=REPO).start()
    ours = start_server(["--model", str(plain), "--factors", str(factors), "--served-model-name", "m",
                         "--rope-start-rule", "window", *ENGINE], logs / "longrope.log",
                        env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    yield stock.base, ours.base
    stop_server(ours)
    stock.stop()


def complete(base: str, **fields) -> dict:
    body = {"model": "m", "prompt": PROMPT, "temperature": 0, "logprobs": 0, **fields}
    reply = httpx.post(f"{base}/v1/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    choice = data["choices"][0]
    return {"text": choice["text"], "finish_reason": choice["finish_reason"], "stop_reason": choice["stop_reason"],
            "tokens": data["usage"]["completion_tokens"], "logprobs": choice["logprobs"]["tokens"]}


def test_every_stop_combination_answers_as_vllm_serve_does(servers):
    stock, ours = servers
    reference = complete(stock, max_tokens=100)
    text = reference["text"]
    frequent = collections.Counter(c for c in text[10:] if c.strip()).most_common(1)[0][0]
    stop_lists = [[frequent], [text[30:33], frequent]]
    token_ids = httpx.post(f"{stock}/tokenize", json={"model": "m", "prompt": PROMPT + text[:60]},
                           timeout=60).json()["tokens"][-20:-19]
    cases = list(itertools.product(stop_lists, (0, 8, 40), (False, True), (None, token_ids)))
    checked = collections.Counter()
    for stop, min_tokens, include, stop_token_ids in cases:
        fields = {"stop": stop, "min_tokens": min_tokens, "include_stop_str_in_output": include}
        if stop_token_ids:
            fields["stop_token_ids"] = stop_token_ids
        for budget in ({"max_tokens": 100}, {}):  # without max_tokens, longrope serve's choice is promotable
            got = complete(ours, **fields, **budget)
            want = complete(stock, **fields, **budget)
            assert got == want, (fields, budget)
            assert want["tokens"] < 200, "every case must stop well before the first set's window"
            checked[want["finish_reason"], str(want["stop_reason"]) == str(stop_token_ids and stop_token_ids[0])] += 1
    assert checked[("stop", False)] and checked[("stop", True)], checked  # stop strings and stop tokens both hit


def test_a_streamed_stop_string_is_cut_as_vllm_cuts_it(servers):
    """Streamed, without max_tokens: the text that reaches the client ends where vLLM's does."""
    stock, ours = servers
    text = complete(stock, max_tokens=60)["text"]
    stop = [text[25:29]]

    def streamed(base: str) -> list[str]:
        body = {"model": "m", "prompt": PROMPT, "temperature": 0, "stop": stop, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=300) as reply:
            lines = [line[6:] for line in reply.iter_lines() if line.startswith("data: {")]
        return [json.loads(line)["choices"][0]["text"] for line in lines if json.loads(line)["choices"]]

    got, want = "".join(streamed(ours)), "".join(streamed(stock))
    assert got == want and text.startswith(want) and len(want) <= 25
