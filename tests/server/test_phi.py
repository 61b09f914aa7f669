"""The official LongRoPE models' shape, served per request and checked against transformers' own Phi-3.

Tiny random-weight ``Phi3ForCausalLM`` models carry the real factor lists of Phi-3.5-mini-instruct
(full rotary, head_dim 96) and Phi-4-mini-instruct (partial rotary 0.75 of 128) in their own
longrope config (W0 = 256, window 1024; rope_ext/models/tiny.py), one in transformers' v4 config
layout, one in v5 with short/long mscales. Each is served from that config alone (no factor file)
by `longrope serve` and by plain `vllm serve` with the plugin. The reference is transformers' own
Phi-3 (its own rotary embedding and its own choice of factors by length, not this project's
tables): a prompt of L tokens is rotated with the short factors when L <= W0, else the long ones.
Transformers applies one attention factor to both sets and ignores the mscales, so for the mscale
model the reference carries the set's mscale as its attention factor.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from harness.servers import vllm_serve
from rope_ext.models.tiny import TINY_MAX_LEN, TINY_W0, build_tiny_phi3
from rope_ext.selftest.reference import ReferenceModel, assert_greedy_matches
from rope_ext.vllm_plugin.model_ladder import ladder_from_config
from tests.helpers import REPO, start_server, stop_server

pytestmark = pytest.mark.server

VARIANTS = {  # name: (real model, config layout, (short_mscale, long_mscale) or None)
    "phi3.5-v4": ("phi-3.5-mini-instruct", "v4", None),
    "phi4mini-v5-mscale": ("phi-4-mini-instruct", "v5", (1.05, 1.25)),
}
SHORT_PROMPT, LONG_PROMPT = 120, 700  # below and above W0
# vLLM's float32 CPU kernels against transformers' SDPA, largest measured: 3.5e-4 nats (the mscale
# model's 700-token prompt: its long set's attention factor 1.25 sharpens every logit; this project's
# tables alone equal transformers' own rotary to 1e-5 there). Whole nats separate the sets.
TOLERANCE = 1e-3
ENGINE = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(TINY_MAX_LEN), "--seed", "0"]


def prompt_of(length: int, seed: int = 0) -> list[int]:
    rng = random.Random(length * 31 + seed)
    return [rng.randrange(100, 49000) for _ in range(length)]


class TransformersPhi3:
    """Transformers' own Phi-3 forward, one model per attention factor it needs."""

    def __init__(self, model_dir: Path, swapped: bool = False):
        self.model_dir, self.swapped, self.models = model_dir, swapped, {}
        self.config = json.loads((model_dir / "config.json").read_text())

    def _model(self, long: bool):
        key = "rope_scaling" if "rope_scaling" in self.config else "rope_parameters"
        params = self.config[key]
        mscale = params.get("long_mscale" if long != self.swapped else "short_mscale")
        if (mscale, self.swapped) not in self.models:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
            rope = model.config.rope_parameters
            if self.swapped:  # the other set's factors under this length's choice: the wrong set on purpose
                rope["short_factor"], rope["long_factor"] = rope["long_factor"], rope["short_factor"]
            if mscale is not None:
                rope["attention_factor"] = mscale
            model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
            self.models[(mscale, self.swapped)] = model
        return self.models[(mscale, self.swapped)]

    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        model = self._model(long=len(ids) > TINY_W0)
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


SERVERS = ("longrope serve", "vllm serve")
EVERY = [(variant, kind) for variant in VARIANTS for kind in SERVERS]


@pytest.fixture(scope="module")
def phi_models(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    """Every variant's model directory, built once."""
    root = tmp_path_factory.mktemp("phi")
    return {name: build_tiny_phi3(root, smollm2_dir, *VARIANTS[name]) for name in VARIANTS}


@pytest.fixture(scope="module")
def references(phi_models) -> dict[str, tuple[TransformersPhi3, TransformersPhi3]]:
    """Per variant: transformers' own Phi-3, and the same with the sets swapped (the wrong set, on purpose)."""
    return {name: (TransformersPhi3(d), TransformersPhi3(d, swapped=True)) for name, d in phi_models.items()}


@pytest.fixture(scope="module")
def served(phi_models, tmp_path_factory):
    """``served(variant, kind)``: the model served from its own config by `longrope serve` or by plain
    `vllm serve` with the plugin; each started once, on first use, and stopped with the module."""
    started: dict[tuple[str, str], object] = {}

    def server(variant: str, kind: str):
        if (variant, kind) not in started:
            log = tmp_path_factory.mktemp("phi-server") / f"{variant}-{kind.split()[0]}.log"
            model_dir = phi_models[variant]
            if kind == "longrope serve":
                # the window start rule: the crossing test needs its request to start below W0, whatever the
                # measured rates say about hiding the switch
                started[variant, kind] = start_server(["--model", str(model_dir), "--served-model-name", "phi",
                                                       "--rope-start-rule", "window", *ENGINE], log,
                                                      env={"VLLM_CPU_KVCACHE_SPACE": "1"})
            else:
                started[variant, kind] = vllm_serve(str(model_dir), ["--served-model-name", "phi", *ENGINE], log,
                                                    env={"VLLM_CPU_KVCACHE_SPACE": "1", "LONGROPE_PLUGIN": None,
                                                         "LONGROPE_FACTORS": None}, cwd=REPO).start()
        return started[variant, kind]

    yield server
    for running in started.values():
        stop_server(running)


def served_prompt_logprobs(client: openai.OpenAI, ids: list[int]) -> list[float]:
    reply = client.completions.create(model="phi", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=0)
    served = reply.choices[0].logprobs.token_logprobs[: len(ids)]
    assert served[0] is None
    return served[1:]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_imported_ladder_is_the_configs_own(phi_models, variant):
    """What the server reads from the config: the short set at W0 and the long one at the window."""
    real, _, mscales = VARIANTS[variant]
    ladder = ladder_from_config(json.loads((phi_models[variant] / "config.json").read_text()))
    assert [(fs.name, fs.window) for fs in ladder.sets] == [("short", TINY_W0), ("long", TINY_MAX_LEN)]
    assert ladder.model.rotary_dim == 96
    if mscales is not None:
        assert [fs.attention_scale for fs in ladder.sets] == list(mscales)


@pytest.mark.parametrize("variant,server_kind", EVERY)
@pytest.mark.parametrize("length", [SHORT_PROMPT, LONG_PROMPT])
def test_short_and_long_prompts_equal_transformers_own_phi3(served, references, variant, server_kind, length):
    client = openai.OpenAI(base_url=served(variant, server_kind).v1, api_key="unused", max_retries=0)
    ids = prompt_of(length)
    right, wrong = (reference.prompt_logprobs(ids) for reference in references[variant])
    got = served_prompt_logprobs(client, ids)
    worst = max(abs(a - b) for a, b in zip(got, right))
    assert worst <= TOLERANCE, f"{server_kind}, {length} tokens: {worst:.2e} from transformers"
    off = max(abs(a - b) for a, b in zip(got, wrong))
    assert off > 1.0, f"the other set is only {off:.2e} away: the check could not tell them apart"


@pytest.mark.parametrize("variant,server_kind", EVERY)
def test_a_mixed_batch_equals_each_requests_own_reference(served, references, variant, server_kind):
    """Short and long Phi requests at once: one engine batch, each rotated with its own set."""
    server = served(variant, server_kind)
    lengths = [60, 700, 200, 450, 130, 900]

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        replies = await asyncio.gather(*(client.completions.create(
            model="phi", prompt=prompt_of(n, seed=1), max_tokens=1, temperature=0, echo=True, logprobs=0)
            for n in lengths))
        await client.close()
        return replies

    for n, reply in zip(lengths, asyncio.run(all_at_once())):
        ids = prompt_of(n, seed=1)
        got = reply.choices[0].logprobs.token_logprobs[1: len(ids)]
        worst = max(abs(a - b) for a, b in zip(got, references[variant][0].prompt_logprobs(ids)))
        assert worst <= TOLERANCE, f"{n}-token request: {worst:.2e} from its reference"


@torch.inference_mode()
def full_forward_greedy(model, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding with transformers' own Phi-3, a full forward over the whole sequence at every step: its
    rotary picks the factors by that length (long from W0 + 1 tokens on), as its generate means to at the crossing."""
    sequence = list(prompt)
    for _ in range(new):
        sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt):]


def test_a_generation_that_crosses_w0_is_promoted_as_transformers_phi3_switches(served, phi_models):
    """A greedy generation from 240 tokens to 300, across W0 = 256, on the model without mscales (with them the
    two sets have attention factors transformers cannot express), through `longrope serve` (plain `vllm serve`
    never promotes).

    Transformers' own Phi-3 keeps the short factors while every position is below W0 (its forward over exactly
    W0 tokens still uses them) and takes the long ones from W0 + 1 tokens on; run with a full forward per step
    it equals the switching reference (this project's tables) that switches at W0 + 1. `longrope serve` moves
    one forward earlier, because a set holds prompt + generated up to its window (vLLM's max_model_len rule):
    it equals the switching reference at W0 (prefilled again under the long set), and the two agree on every
    token produced before the crossing.

    Transformers 5's own ``generate`` does otherwise: at the crossing its Phi-3 drops the cache, but then every
    later step runs on the newest token alone, with no cache (asserted below, so that a transformers that
    prefills again there shows up here): its tokens past W0 come from no context at all.
    """
    model_dir = phi_models["phi3.5-v4"]
    prompt, new = prompt_of(240, seed=2), 60
    before = TINY_W0 - len(prompt)  # tokens produced from fewer than W0 tokens: the short set everywhere
    ladder = ladder_from_config(json.loads((model_dir / "config.json").read_text()))
    reference = ReferenceModel(model_dir, ladder, TINY_MAX_LEN)
    ours = reference.run(prompt, new, "short", switch_to="long", switch_at=TINY_W0)
    at_w0_plus_1 = reference.run(prompt, new, "short", switch_to="long", switch_at=TINY_W0 + 1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    theirs = full_forward_greedy(model, prompt, new)
    steps = at_w0_plus_1.comparable_steps()
    assert steps > before + 1, "a near-tie before the crossing: nothing to compare past it"
    assert theirs[:steps] == at_w0_plus_1.tokens[:steps]

    client = openai.OpenAI(base_url=served("phi3.5-v4", "longrope serve").v1, api_key="unused", max_retries=0)
    reply = client.completions.create(model="phi", prompt=prompt, max_tokens=new, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = reply.choices[0]
    assert choice.model_extra["rope_promotions"] == [{"from": "short", "to": "long", "at_tokens": TINY_W0}]
    assert_greedy_matches(ours, choice.token_ids, choice.logprobs.token_logprobs, "promoted Phi generation")
    assert choice.token_ids[:before] == theirs[:before]

    seen = []  # what transformers' generate runs at each step: (input tokens, cached tokens)
    forward = model.forward

    def spy(*args, **kwargs):
        cache = kwargs.get("past_key_values")
        seen.append((kwargs["input_ids"].shape[1], cache.get_seq_length() if cache is not None else 0))
        return forward(*args, **kwargs)

    model.forward = spy
    model.generate(torch.tensor([prompt]), max_new_tokens=before + 4, min_new_tokens=before + 4, do_sample=False)
    assert seen[: before + 1] == [(len(prompt), 0)] + [(1, len(prompt) + i) for i in range(before)]
    assert seen[before + 1:] == [(1, 0)] * 3  # past the crossing: one token, no cache, no context
