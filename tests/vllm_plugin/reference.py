"""The transformers reference (one request alone, rotated with one factor set, float32) and the
one comparison every test makes between an engine's greedy output and it.

Greedy decoding of a random-weight model meets near-ties: steps where the reference's top two
logprobs are closer than any kernel's rounding. Which of two tied tokens wins there is decided
by the last bit of a kernel and by the batch's shape, not by the factor set, so a comparison
that goes past such a step fails on one processor and passes on another. `assert_greedy_matches`
therefore compares up to and including the first near-tie, and asserts it compared most of
the request, so the check can never become empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from rope_ext.factors import Ladder
from rope_ext.hf_model import RotatedModel

# Float32 vLLM CPU kernels against float32 transformers, one tolerance for every set.
# Measured here: largest difference 5e-5 nats (a 600-token prompt in the long set).
LOGPROB_TOLERANCE = 2e-4
# A step whose reference top-two logprobs are closer than this is a near-tie: ten times the
# tolerance, so that rounding within the tolerance cannot flip a step outside the margin.
TIE_MARGIN = 10 * LOGPROB_TOLERANCE
# Steps compared before the first near-tie, at least, as a share of the request's tokens.
MIN_COMPARED_SHARE = 0.5


@dataclass
class Reference:
    tokens: list[int]
    token_logprobs: list[float]
    prompt_logprobs: list[float]
    runner_up: list[int]  # the second most likely token at each step
    runner_up_logprobs: list[float]

    def comparable_steps(self) -> int:
        """Steps up to and including the first near-tie (all of them when there is none)."""
        for step, (best, second) in enumerate(zip(self.token_logprobs, self.runner_up_logprobs)):
            if best - second < TIE_MARGIN:
                return step + 1
        return len(self.tokens)


class ReferenceModel:
    """A transformers Llama whose rotary embedding reads rope_ext's tables for a chosen set."""

    def __init__(self, model_dir, ladder: Ladder, max_positions: int):
        self.rotated = RotatedModel(model_dir, ladder.model, max_positions)
        self.model = self.rotated.model
        self.ladder = ladder

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        logits = self.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def run(self, prompt: list[int], max_tokens: int, set_name: str | None, switch_to: str | None = None,
            switch_at: int | None = None, eos_token_id: int | None = None) -> Reference:
        """Greedy decode recomputing everything each step; optionally switch sets at a sequence length.

        ``set_name`` None runs the model with its own rotary embedding (the plain model). With
        ``eos_token_id`` it stops after producing that token, as the engine does.
        """
        self.rotated.use(self.ladder.sets[self.ladder.index_of(set_name)] if set_name else None)
        lp = self._logprobs(prompt)
        prompt_lp = lp[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()
        ids, out = list(prompt), Reference([], [], prompt_lp, [], [])
        for _ in range(max_tokens):
            if switch_to and len(ids) >= switch_at:
                self.rotated.use(self.ladder.sets[self.ladder.index_of(switch_to)])
            top = self._logprobs(ids)[-1].topk(2)
            (first, second), (first_lp, second_lp) = top.indices.tolist(), top.values.tolist()
            out.tokens.append(first)
            out.token_logprobs.append(first_lp)
            out.runner_up.append(second)
            out.runner_up_logprobs.append(second_lp)
            ids.append(first)
            if first == eos_token_id:
                break
        return out


def assert_greedy_matches(ref: Reference, tokens: list | None, logprobs: list[float], where: str,
                          prompt_logprobs: list[float] | None = None) -> int:
    """Assert an engine's greedy output equals ``ref`` up to and including the first near-tie.

    Before it, tokens are equal and logprobs within LOGPROB_TOLERANCE; at it, the engine's token
    is one of the reference's top two, with that token's logprob. Prompt logprobs do not depend
    on decoding and are compared whole. ``tokens`` None compares the logprobs alone, for an API
    that returns no token ids: another token than the reference's, away from a near-tie, has a
    logprob at least TIE_MARGIN lower, far outside the tolerance. Returns how many steps were
    compared, asserted to be most of the request.
    """
    steps = ref.comparable_steps()
    assert steps >= MIN_COMPARED_SHARE * len(ref.tokens), (
        f"{where}: the reference has a near-tie (top two within {TIE_MARGIN}) at step {steps - 1} "
        f"of {len(ref.tokens)}: too early for a meaningful comparison")
    assert len(logprobs) >= steps and (tokens is None or len(tokens) >= steps), f"{where}: output too short"
    for step in range(steps):
        best = (ref.tokens[step], ref.token_logprobs[step])
        second = (ref.runner_up[step], ref.runner_up_logprobs[step])
        tied = ref.token_logprobs[step] - ref.runner_up_logprobs[step] < TIE_MARGIN
        allowed = [best, second] if tied else [best]
        got_token = tokens[step] if tokens is not None else None
        assert any(
            (got_token is None or got_token == token) and abs(logprobs[step] - lp) <= LOGPROB_TOLERANCE
            for token, lp in allowed
        ), f"{where}: step {step}: got ({got_token}, {logprobs[step]}), reference allows {allowed}"
    if prompt_logprobs is not None:
        assert prompt_logprobs == pytest.approx(ref.prompt_logprobs, abs=LOGPROB_TOLERANCE), where
    return steps
