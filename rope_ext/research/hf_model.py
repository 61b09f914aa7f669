"""A transformers causal LM rotated with a rope_ext factor set, and its fast scoring forward.

The search, the evaluations and the tests' reference all need the same thing: the model as
transformers runs it (SDPA attention, float32), but with cos/sin read from our tables, so
that n̂ and per-set attention scales are exact. Swapping the rotary module is all it takes:
every decoder layer receives the (cos, sin) the model computes once per forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from rope_ext.factors import FactorSet, ModelInfo
from rope_ext.frequencies import rotary_tables

# Logits for a 16k sequence would be 16384 × 49152 floats (3.2 GB); score this many rows at a time.
_SCORE_CHUNK = 2048


class TableRotary(nn.Module):
    """Drop-in for a transformers rotary embedding: looks positions up in precomputed tables."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        # transformers' layout repeats the half-dimension tables: [cos | cos], [sin | sin].
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat((sin, sin), dim=-1), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[position_ids].to(x.dtype), self.sin[position_ids].to(x.dtype)


class RotatedModel:
    """A transformers causal LM whose rotary embedding is switched between factor sets."""

    def __init__(self, model_dir: str | Path, info: ModelInfo, max_positions: int, dtype: torch.dtype = torch.float32):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval()
        self.info = info
        self.max_positions = max_positions
        self.plain_rotary = self.model.model.rotary_emb
        self.active: FactorSet | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def use(self, factor_set: FactorSet | None) -> None:
        """Rotate with ``factor_set``; None restores the model's own rotary embedding.

        Asking again for the set already in use keeps its tables (callers switch per step).
        """
        if factor_set == self.active:
            return
        self.active = factor_set
        if factor_set is None:
            self.model.model.rotary_emb = self.plain_rotary
            return
        cos, sin = rotary_tables(factor_set, self.info.rope_theta, self.info.rotary_dim, self.max_positions,
                                 self.device)
        self.model.model.rotary_emb = TableRotary(cos, sin)

    def token_nll(self, ids: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ids[1:] given their prefixes, one float per predicted token."""
        return self.token_scores(ids)[0]

    @torch.inference_mode()
    def token_scores(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per predicted token ids[1:]: its negative log-likelihood and whether it is the argmax.

        Runs the decoder once and applies the LM head in chunks, so memory stays linear in
        the length and no full logits tensor is ever built. "Is the argmax" for every answer
        token is exactly "greedy decoding would have produced the answer".
        """
        ids = ids.to(self.device).view(1, -1)
        hidden = self.model.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
        return self.score_hidden(hidden, ids[0, 1:])

    @torch.inference_mode()
    def score_hidden(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``token_scores`` from the decoder's last hidden states, row i predicting targets[i]."""
        targets = targets.to(self.device)
        nll = torch.empty(targets.numel(), dtype=torch.float32, device=self.device)
        top1 = torch.empty(targets.numel(), dtype=torch.bool, device=self.device)
        for start in range(0, targets.numel(), _SCORE_CHUNK):
            rows = slice(start, start + _SCORE_CHUNK)
            logits = self.model.lm_head(hidden[rows]).float()
            picked = logits.gather(1, targets[rows, None])[:, 0]
            nll[rows] = torch.logsumexp(logits, -1) - picked
            top1[rows] = logits.argmax(-1) == targets[rows]
        return nll.cpu(), top1.cpu()

    @torch.inference_mode()
    def token_nll_plain_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The same quantity the way a user would write it: full logits, then cross-entropy.

        Kept as the yardstick the fast path is measured against (speed and equality).
        """
        ids = ids.to(self.device).view(1, -1)
        logits = self.model(input_ids=ids).logits[0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").cpu()
