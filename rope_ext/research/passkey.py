"""Passkey retrieval: a number hidden at some depth of a long prompt, asked for at the end.

The prompt is the one LongRoPE evaluates with (from Mohtashami & Jaggi's landmark-attention
test): a task line, repeated filler sentences, the key line at the chosen depth, more
filler, then the question. The model passes when greedy decoding reproduces the key; we
check that in one forward pass, as "every answer token is the argmax given its prefix".

The same builder with a real book as the haystack gives LongRoPE2's needle-driven
perplexity samples: perplexity over the answer tokens only.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from rope_ext.factors import FactorSet
from rope_ext.research.hf_model import RotatedModel
from rope_ext.research.perplexity import Sample

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = " What is the pass key? The pass key is"


def _needle(key: int) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key."


def passkey_sample(tokenizer, length: int, depth: float, key: int, haystack: list[int] | None = None) -> Sample:
    """A prompt of exactly ``length`` tokens (answer included) with the key at ``depth`` ∈ [0, 1].

    The haystack is the filler sentence repeated, or the given book tokens. Only the answer
    tokens are scored.
    """
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    head, needle, question, answer = encode(TASK), encode(_needle(key)), encode(QUESTION), encode(f" {key}")
    room = length - len(head) - len(needle) - len(question) - len(answer)
    if room < 0:
        raise ValueError(f"length {length} is too short for a passkey prompt")
    if haystack is None:
        filler = encode(FILLER)
        haystack = filler * (room // len(filler) + 1)
    if len(haystack) < room:
        raise ValueError(f"haystack of {len(haystack)} tokens cannot fill {room}")
    hay = haystack[:room]
    cut = int(round(depth * room))
    ids = head + hay[:cut] + needle + hay[cut:] + question + answer
    scored = torch.zeros(len(ids) - 1, dtype=torch.bool)
    scored[-len(answer) :] = True
    return Sample(torch.tensor(ids), scored)


@dataclass(frozen=True)
class PasskeyTrial:
    length: int
    depth: float
    key: int
    passed: bool
    answer_nll: float  # summed over the answer tokens: how sure the model is, even when it fails


def spread_depths(count: int) -> list[float]:
    """``count`` depths at (i + 0.5) / count: one per equal slice of the window, none at its very edges."""
    if count < 1:
        raise ValueError(f"depth count {count} must be at least 1")
    return [(i + 0.5) / count for i in range(count)]


def trial_plan(depths: list[float], trials: int, seed: int) -> list[tuple[float, int]]:
    """(depth, key) of every trial: each depth ``trials`` times, keys drawn from ``seed``.

    The plan ignores length and method, so every method at every length sees the same keys,
    and a trial is identified by its depth and key alone (what a resumed run looks up). Keys
    are drawn round by round (every depth once, then again), so a plan with more trials per
    depth holds the smaller one: raising ``trials`` adds trials and re-measures none.
    """
    rng = random.Random(seed)
    return [(depth, rng.randint(10000, 99999)) for _ in range(trials) for depth in depths]


def last_tokens(sample: Sample, context: int) -> Sample:
    """The sample as a model that sees only its last ``context`` tokens gets it (the sliding floor).

    The answer sits at the end, so it stays scored; a key further back than ``context`` is cut off.
    """
    if context >= len(sample.ids):
        return sample
    return Sample(sample.ids[-context:], None if sample.scored is None else sample.scored[-(context - 1) :])


def passkey_trial(model: RotatedModel, tokenizer, length: int, depth: float, key: int,
                  context: int | None = None, haystack: list[int] | None = None) -> PasskeyTrial:
    """One prompt, one forward, with whatever set ``model`` is rotated with now.

    ``context``: the model sees only the prompt's last ``context`` tokens (the sliding-window floor).
    ``haystack``: book tokens around the key instead of the filler sentences.
    """
    sample = passkey_sample(tokenizer, length, depth, key, haystack)
    if context is not None:
        sample = last_tokens(sample, context)
    nll, top1 = model.token_scores(sample.ids)
    return PasskeyTrial(length, depth, key, bool(top1[sample.scored].all()), float(nll[sample.scored].sum()))


def passkey_trials(
    model: RotatedModel,
    tokenizer,
    factor_set: FactorSet | None,
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int,
) -> list[PasskeyTrial]:
    """Every (length, depth) cell ``trials`` times, with the keys of :func:`trial_plan`."""
    model.use(factor_set)
    plan = trial_plan(depths, trials, seed)
    return [passkey_trial(model, tokenizer, length, depth, key) for length in lengths for depth, key in plan]


def wilson_interval(passed: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95 % by default) for a pass rate of ``passed`` out of ``n``.

    Unlike p ± z·sqrt(p(1-p)/n), it stays inside [0, 1] and is not empty at 0/n or n/n,
    where passkey cells often sit. Two methods whose intervals do not overlap are separated.
    """
    if not 0 <= passed <= n or n < 1:
        raise ValueError(f"{passed} passes out of {n} trials")
    p, z2 = passed / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at 0/n and n/n the bound is exactly 0 or 1; the float sum misses it by an ulp, below the rate itself
    return (0.0 if passed == 0 else centre - half), (1.0 if passed == n else centre + half)


def needle_samples(tokenizer, data, length: int, per_book: int, seed: int) -> list[Sample]:
    """LongRoPE2's needle-driven perplexity data: book chunks, each with a key at a random depth.

    Only the answer tokens are scored, so the fitness rewards retrieving from far back
    rather than predicting nearby text well.
    """
    from rope_ext.research.perplexity import documents

    rng = random.Random(seed)
    samples = []
    for doc in documents(tokenizer, data, length, per_book):
        key, depth = rng.randint(10000, 99999), rng.uniform(0.1, 0.9)
        samples.append(passkey_sample(tokenizer, length, depth, key, haystack=doc.ids.tolist()))
    return samples
