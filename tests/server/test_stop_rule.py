"""Stop strings, min_tokens, include_stop_str_in_output and stop_token_ids: `longrope serve` answers exactly as
`vllm serve` does, with a max_tokens its start set holds (vLLM's own request, passed through) and with one it
does not (a promotable choice, whose stop strings vLLM's own detokenizer checks over the whole choice,
server/promotion.py).

The same tiny weights behind both: stock `vllm serve` (plugin off) on a plain RoPE config, `longrope serve` on
the same model with the tiny ladder, whose first set is plain RoPE to 256 tokens.
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
PROMOTABLE = 400  # more than the first set's 256 tokens hold: longrope serve runs the choice in segments
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
    stock = vllm_serve(str(plain), ["--served-model-name", "m", "--max-model-len", "1024", *ENGINE],
                       logs / "vllm.log", env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"},
                       cwd=REPO).start()
    ours = start_server(["--model", str(plain), "--factors", str(factors), "--served-model-name", "m",
                         "--rope-start-rule", "window", *ENGINE], logs / "longrope.log",
                        env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    yield stock.base, ours.base
    stop_server(ours)
    stock.stop()


def complete(base: str, **fields) -> dict:
    body = {"model": "m", "prompt": PROMPT, "temperature": 0, **fields}
    reply = httpx.post(f"{base}/v1/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    choice = data["choices"][0]
    return {"text": choice["text"], "finish_reason": choice["finish_reason"], "stop_reason": choice["stop_reason"],
            "tokens": data["usage"]["completion_tokens"], "logprobs": (choice["logprobs"] or {}).get("tokens")}


def test_every_stop_combination_answers_as_vllm_serve_does(servers):
    stock, ours = servers
    reference = complete(stock, max_tokens=100, logprobs=0, return_tokens_as_token_ids=True)
    text, ids = reference["text"], [int(t.split(":")[1]) for t in reference["logprobs"]]
    frequent = collections.Counter(c for c in text[10:] if c.strip()).most_common(1)[0][0]
    token = collections.Counter(ids[45:]).most_common(1)[0][0]  # so it ends the min_tokens=40 cases too
    stop_lists = [[frequent], [text[30:33], frequent], []]
    cases = [case for case in itertools.product(stop_lists, (0, 40), (False, True), (None, [token]))
             if case[0] or case[3]]  # something must end it before the first set's window
    ended = collections.Counter()
    for stop, min_tokens, include, stop_token_ids in cases:
        # no logprobs: vLLM answers a -inf logprob (a token min_tokens held back) with a 400
        fields = {"stop": stop, "min_tokens": min_tokens, "include_stop_str_in_output": include}
        if stop_token_ids:
            fields["stop_token_ids"] = stop_token_ids
        for max_tokens in (100, PROMOTABLE):
            got = complete(ours, **fields, max_tokens=max_tokens)
            want = complete(stock, **fields, max_tokens=max_tokens)
            assert got == want, (fields, max_tokens)
            assert want["tokens"] < 200, "every case must stop well before the first set's window"
            ended["token" if want["stop_reason"] == token else want["finish_reason"]] += 1
    assert ended["stop"] and ended["token"], ended  # stop strings and stop tokens both ended some


def test_a_streamed_stop_string_is_cut_as_vllm_cuts_it(servers):
    """Streamed and promotable: the text that reaches the client ends where vLLM's does."""
    stock, ours = servers
    text = complete(stock, max_tokens=60)["text"]
    stop = [text[25:29]]

    def streamed(base: str) -> list[str]:
        body = {"model": "m", "prompt": PROMPT, "temperature": 0, "stop": stop, "stream": True,
                "max_tokens": PROMOTABLE}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=300) as reply:
            lines = [line[6:] for line in reply.iter_lines() if line.startswith("data: {")]
        return [json.loads(line)["choices"][0]["text"] for line in lines if json.loads(line)["choices"]]

    got, want = "".join(streamed(ours)), "".join(streamed(stock))
    assert got == want and text.startswith(want) and len(want) <= 25
