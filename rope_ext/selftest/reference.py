"""The transformers reference (one request alone, rotated with one factor set, float32) and the
one comparison every check makes between an engine's greedy output and it.

Greedy decoding of a random-weight model meets near-ties: steps where the reference's top two
logprobs are closer than any kernel's rounding. Which of two tied tokens wins there is decided
by the last bit of a kernel and by the batch's shape, not by the factor set, so a comparison
that goes past such a step fails on one processor and passes on another. `compare` therefore
compares up to and including the first near-tie, and requires that it compared most of the
request, so the check can never become empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rope_ext.factors import Ladder
from rope_ext.research.hf_model import RotatedModel

# Float32 vLLM against float32 transformers, one tolerance per engine device, for every set.
# cpu: the largest difference measured moves with the host CPU: 5e-5 nats for the tiny Llama's
# 600-token long-set prompt; the Phi-4-mini shape's prompt just past its first window reached 2.1e-4 compiled
# and 1.9e-4 eager on an AMD EPYC host (float32 sums taken in another order), so 5e-4: 2.4× that.
# cuda: vLLM's float32 attention there is a Triton kernel whose dot products run in TF32
# (10-bit mantissa, ~5e-4 relative); not measured here (no GPU): four times the CPU value.
TOLERANCES = {"cpu": 5e-4, "cuda": 2e-3}
# Steps compared before the first near-tie, at least, as a share of the request's tokens.
MIN_COMPARED_SHARE = 0.5


def engine_device() -> str:
    from vllm.platforms import current_platform

    return current_platform.device_type


LOGPROB_TOLERANCE = TOLERANCES.get(engine_device(), TOLERANCES["cuda"])
# A step whose reference top-two logprobs are closer than this is a near-tie. Rounding within the
# tolerance moves each of the two by at most that, so only a gap under twice it can flip; four times
# leaves room. Wider, the tiny random-weight model's mid and long requests meet a near-tie too early
# to compare enough steps (at 5e-3: step 2 of 200).
TIE_MARGIN = 4 * LOGPROB_TOLERANCE


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

    def _use(self, set_name: str | None) -> None:
        self.rotated.use(self.ladder.sets[self.ladder.index_of(set_name)] if set_name else None)

    def _decode(self, ids: list[int], cache=None) -> tuple[torch.Tensor, object]:
        """The decoder's last hidden states for ``ids`` (appended to ``cache`` when given), and the cache."""
        out = self.model.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        return out.last_hidden_state[0], out.past_key_values

    @torch.inference_mode()
    def run(self, prompt: list[int], max_tokens: int, set_name: str | None, switch_to: str | None = None,
            switch_at: int | None = None, eos_token_id: int | None = None) -> Reference:
        """Greedy decode with one request alone; optionally switch sets at a sequence length.

        A switch recomputes the whole sequence under the new set (as promotion prefills it again).
        ``set_name`` None runs the model with its own rotary embedding (the plain model). With
        ``eos_token_id`` it stops after producing that token, as the engine does.
        """
        self._use(set_name)
        ids = list(prompt)
        hidden, cache = self._decode(ids)
        prompt_nll, _ = self.rotated.score_hidden(hidden[:-1], torch.tensor(prompt[1:]))
        out = Reference([], [], (-prompt_nll).tolist(), [], [])
        switched = False
        for step in range(max_tokens):
            if switch_to and not switched and len(ids) >= switch_at:
                self._use(switch_to)
                hidden, cache = self._decode(ids)
                switched = True
            top = torch.log_softmax(self.model.lm_head(hidden[-1:]).float()[0], dim=-1).topk(2)
            (first, second), (first_lp, second_lp) = top.indices.tolist(), top.values.tolist()
            out.tokens.append(first)
            out.token_logprobs.append(first_lp)
            out.runner_up.append(second)
            out.runner_up_logprobs.append(second_lp)
            ids.append(first)
            if first == eos_token_id or step == max_tokens - 1:
                break
            hidden, cache = self._decode([first], cache)
        return out


@dataclass
class Comparison:
    steps: int  # decode steps compared (up to and including the first near-tie)
    equal_tokens: int  # of those, steps whose token the reference allows
    max_delta: float  # largest |Δ logprob| over the compared steps and prompt logprobs
    problem: str | None  # None when the output matches


def compare(ref: Reference, tokens: list | None, logprobs: list[float],
            prompt_logprobs: list[float] | None = None) -> Comparison:
    """An engine's greedy output against ``ref`` up to and including the first near-tie.

    Before it, tokens are equal and logprobs within LOGPROB_TOLERANCE; at it, the engine's token
    is one of the reference's top two, with that token's logprob. Prompt logprobs do not depend
    on decoding and are compared whole. ``tokens`` None compares the logprobs alone, for an API
    that returns no token ids: another token than the reference's, away from a near-tie, has a
    logprob at least TIE_MARGIN lower, far outside the tolerance.
    """
    steps = ref.comparable_steps()
    problems: list[str] = []
    if steps < MIN_COMPARED_SHARE * len(ref.tokens):
        problems.append(f"the reference has a near-tie (top two within {TIE_MARGIN}) at step {steps - 1} "
                        f"of {len(ref.tokens)}: too early for a meaningful comparison")
    if len(logprobs) < steps or (tokens is not None and len(tokens) < steps):
        return Comparison(steps, 0, float("inf"), f"output shorter ({len(logprobs)}) than the {steps} steps compared")
    equal, worst = 0, 0.0
    for step in range(steps):
        allowed = [(ref.tokens[step], ref.token_logprobs[step])]
        if ref.token_logprobs[step] - ref.runner_up_logprobs[step] < TIE_MARGIN:
            allowed.append((ref.runner_up[step], ref.runner_up_logprobs[step]))
        got = tokens[step] if tokens is not None else None
        deltas = [abs(logprobs[step] - lp) for token, lp in allowed if got is None or got == token]
        equal += bool(deltas)
        delta = min(deltas) if deltas else abs(logprobs[step] - allowed[0][1])
        worst = max(worst, delta)
        if not deltas or delta > LOGPROB_TOLERANCE:
            problems.append(f"step {step}: got ({got}, {logprobs[step]}), reference allows {allowed}")
    if prompt_logprobs is not None:
        if len(prompt_logprobs) != len(ref.prompt_logprobs):
            problems.append(f"{len(prompt_logprobs)} prompt logprobs, reference has {len(ref.prompt_logprobs)}")
        else:
            prompt_worst = max((abs(a - b) for a, b in zip(prompt_logprobs, ref.prompt_logprobs)), default=0.0)
            worst = max(worst, prompt_worst)
            if prompt_worst > LOGPROB_TOLERANCE:
                problems.append(f"prompt logprobs differ by up to {prompt_worst:.2e} (tolerance {LOGPROB_TOLERANCE})")
    return Comparison(steps, equal, worst, "; ".join(problems[:3]) or None)


def assert_greedy_matches(ref: Reference, tokens: list | None, logprobs: list[float], where: str,
                          prompt_logprobs: list[float] | None = None) -> int:
    """``compare``, raising AssertionError with ``where`` on a mismatch; returns the steps compared."""
    result = compare(ref, tokens, logprobs, prompt_logprobs)
    if result.problem:
        raise AssertionError(f"{where}: {result.problem}")
    return result.steps
