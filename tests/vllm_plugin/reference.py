"""The transformers reference: one request alone, rotated with one factor set (float32)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rope_ext.factors import Ladder
from rope_ext.hf_model import RotatedModel


@dataclass
class Reference:
    tokens: list[int]
    token_logprobs: list[float]
    prompt_logprobs: list[float]


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

    def run(self, prompt: list[int], max_tokens: int, set_name: str, switch_to: str | None = None,
            switch_at: int | None = None) -> Reference:
        """Greedy decode recomputing everything each step; optionally switch sets at a sequence length."""
        self.rotated.use(self.ladder.sets[self.ladder.index_of(set_name)])
        lp = self._logprobs(prompt)
        prompt_lp = lp[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()
        ids, out, out_lp = list(prompt), [], []
        for _ in range(max_tokens):
            if switch_to and len(ids) >= switch_at:
                self.rotated.use(self.ladder.sets[self.ladder.index_of(switch_to)])
            last = self._logprobs(ids)[-1]
            token = int(last.argmax())
            out.append(token)
            out_lp.append(float(last[token]))
            ids.append(token)
        return Reference(out, out_lp, prompt_lp)
