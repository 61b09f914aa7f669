"""Frequency math: a factor set becomes inv_freq and the cos/sin tables a rotary embedding looks up.

Computed in float32 with the same operation order as transformers and vLLM, so our tables
match theirs to float rounding: inv_freq_i = 1 / (λ_i · θ^(2i/d)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rope_ext.factors import FactorSet, Ladder


def base_powers(rope_theta: float, rotary_dim: int) -> torch.Tensor:
    """θ^(2i/d) for i < d/2: the wavelength divisors of plain RoPE."""
    return rope_theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim)


def inv_freq(factors: Sequence[float], rope_theta: float, rotary_dim: int) -> torch.Tensor:
    """Inverse frequencies of RoPE with each frequency slowed down by its rescale factor λ_i."""
    lam = torch.tensor(list(factors), dtype=torch.float32)
    return 1.0 / (lam * base_powers(rope_theta, rotary_dim))


def rotary_tables(
    factor_set: FactorSet, rope_theta: float, rotary_dim: int, num_positions: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [num_positions, rotary_dim / 2], for one factor set.

    Rows below n_hat use the plain frequencies (LongRoPE keeps the first tokens unscaled);
    every row is multiplied by the set's attention scale. ``device`` builds the tables where
    they are used (the search builds one per evaluation: on a GPU, no host work and no copy);
    inv_freq itself is always computed on the CPU, so only cos and sin run elsewhere.
    """
    positions = torch.arange(num_positions, dtype=torch.float32, device=device)
    scaled = torch.outer(positions, inv_freq(factor_set.factors, rope_theta, rotary_dim).to(device=device))
    if factor_set.n_hat:
        plain_freq = inv_freq([1.0] * (rotary_dim // 2), rope_theta, rotary_dim).to(device=device)
        scaled[: factor_set.n_hat] = torch.outer(positions[: factor_set.n_hat], plain_freq)
    scale = factor_set.attention_scale if factor_set.attention_scale is not None else 1.0
    return scaled.cos() * scale, scaled.sin() * scale


def ladder_cos_sin_cache(ladder: Ladder, num_positions: int) -> torch.Tensor:
    """All sets' tables stacked as vLLM's cos_sin_cache layout ([cos | sin] per row).

    Set k occupies rows [k · num_positions, (k + 1) · num_positions), so a token of set k at
    position p reads row k · num_positions + p.
    """
    info = ladder.model
    blocks = []
    for fs in ladder.sets:
        cos, sin = rotary_tables(fs, info.rope_theta, info.rotary_dim, num_positions)
        blocks.append(torch.cat((cos, sin), dim=-1))
    return torch.cat(blocks, dim=0)
