"""The rotary embedding that holds every factor set of a ladder in one table.

It is vLLM's own ``RotaryEmbedding`` (same CPU, CUDA and native kernels, same compile
behaviour) with a different cos/sin cache: set k's rows start at k · rows_per_set. The
runner shifts each token's position by its set's start, so a plain index lookup rotates
it with its own set, and nothing per step lives inside the (compiled) model.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

from rope_ext.factors import Ladder
from rope_ext.frequencies import ladder_cos_sin_cache


class LadderRotaryEmbedding(RotaryEmbedding):
    def __init__(
        self,
        ladder: Ladder,
        rows_per_set: int,
        head_size: int,
        is_neox_style: bool,
        dtype: torch.dtype,
    ) -> None:
        self.ladder = ladder
        self.rows_per_set = rows_per_set
        super().__init__(
            head_size=head_size,
            rotary_dim=ladder.model.rotary_dim,
            max_position_embeddings=rows_per_set * len(ladder.sets),
            base=ladder.model.rope_theta,
            is_neox_style=is_neox_style,
            dtype=dtype,
        )

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        return ladder_cos_sin_cache(self.ladder, self.rows_per_set)

    def extra_repr(self) -> str:
        return f"sets={self.ladder.names}, rows_per_set={self.rows_per_set}, " + super().extra_repr()
