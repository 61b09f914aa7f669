"""docs/design.md, rule 6: plain `vllm serve` with only our package installed chooses the set per request.

The tiny model's config carries a Phi-3 style longrope ladder (short at 256, long at 1024);
no LONGROPE_FACTORS, no front end of ours. One request pins a set through `vllm_xargs`,
two are placed by the budget rule; each matches the transformers reference of its set.
"""

import os
import random
import subprocess
import sys

import openai
import pytest

from harness.servers import free_port, wait_until_ok
from rope_ext.hf_config import ladder_from_hf
from rope_ext.models.tiny import TINY_MAX_LEN
from rope_ext.selftest.reference import LOGPROB_TOLERANCE, ReferenceModel, assert_greedy_matches
from tests.helpers import REPO

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def vllm_server(tiny_model, tmp_path_factory):
    model_dir = tiny_model[0]
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "vllm-serve.log").open("w+")
    env = {k: v for k, v in os.environ.items() if k not in ("LONGROPE_FACTORS", "LONGROPE_PLUGIN")}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rope_ext.vllm_cli", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32",
         "--max-model-len", str(TINY_MAX_LEN), "--enforce-eager", "--seed", "0", "--served-model-name", "tiny"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )
    base = f"http://127.0.0.1:{port}"
    if not wait_until_ok(f"{base}/health", proc, timeout=300):
        proc.kill()
        log.seek(0)
        raise AssertionError(f"vllm serve did not start:\n{log.read()[-6000:]}")
    yield base
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_model):
    import json

    model_dir = tiny_model[0]
    ladder = ladder_from_hf(json.loads((model_dir / "config.json").read_text()))
    return ladder, ReferenceModel(model_dir, ladder, TINY_MAX_LEN)


CASES = {
    "pinned long": (50, 8, "long", "long"),
    "budget short": (50, 8, None, "short"),  # 58 <= 256
    "budget long": (200, 80, None, "long"),  # 280 > 256
}


@pytest.mark.parametrize("case", CASES)
def test_request_matches_reference_of_its_set(vllm_server, reference, case):
    prompt_len, max_tokens, pinned, expected_set = CASES[case]
    ladder, ref_model = reference
    rng = random.Random(prompt_len)
    prompt = [rng.randrange(100, 49000) for _ in range(prompt_len)]
    client = openai.OpenAI(base_url=f"{vllm_server}/v1", api_key="unused")
    extra = {"return_token_ids": True}
    if pinned:
        extra["vllm_xargs"] = {"rope_set": pinned}
    completion = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0, extra_body=extra
    )
    choice = completion.choices[0]
    ref = ref_model.run(prompt, max_tokens, expected_set)
    other = ref_model.run(prompt, max_tokens, "short" if expected_set == "long" else "long")
    assert_greedy_matches(ref, choice.token_ids, choice.logprobs.token_logprobs, case)
    # and the other set would have given something else: the match is not a coincidence
    assert choice.logprobs.token_logprobs != pytest.approx(other.token_logprobs, abs=LOGPROB_TOLERANCE)


def test_unknown_pinned_set_is_a_400(vllm_server):
    client = openai.OpenAI(base_url=f"{vllm_server}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=2,
                                  extra_body={"vllm_xargs": {"rope_set": "huge"}})
    assert "no factor set named 'huge'" in str(info.value)
