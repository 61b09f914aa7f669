"""Factor sets of the classic context-extension methods, expressed as LongRoPE λ.

Each method is one pure function ``(model, window) -> FactorSet``, registered in
:data:`METHODS`; adding a method is one function and one entry. They seed the search
and are the baselines of every evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from rope_ext.factors import FORMAT_VERSION, FactorSet, Ladder, ModelInfo, default_attention_scale


def _scale(model: ModelInfo, window: int) -> float:
    return window / model.original_window


def pi_set(model: ModelInfo, window: int) -> FactorSet:
    """Position interpolation: every frequency slowed by s = window / W0."""
    s = _scale(model, window)
    return FactorSet(name=f"pi-{window}", window=window, factors=[s] * (model.rotary_dim // 2), attention_scale=1.0)


def ntk_base(model: ModelInfo, scale: float) -> float:
    """NTK-aware base change θ' = θ · s^(d/(d-2)): the base a stock engine is given for NTK by hand."""
    d = model.rotary_dim
    return model.rope_theta * scale ** (d / (d - 2))


def ntk_factors(model: ModelInfo, scale: float) -> list[float]:
    """`ntk_base` written as λ_i = s^(2i/(d-2)), so that it runs as a LongRoPE set."""
    d = model.rotary_dim
    return [scale ** (2 * i / (d - 2)) for i in range(d // 2)]


def ntk_set(model: ModelInfo, window: int) -> FactorSet:
    return FactorSet(
        name=f"ntk-{window}", window=window, factors=ntk_factors(model, _scale(model, window)), attention_scale=1.0
    )


def yarn_factors(model: ModelInfo, scale: float, beta_fast: float = 32.0, beta_slow: float = 1.0) -> list[float]:
    """YaRN's ramp: fast dimensions keep their frequency, slow ones are interpolated by s, a linear blend between."""
    d, theta, w0 = model.rotary_dim, model.rope_theta, model.original_window

    def correction_dim(rotations: float) -> float:
        return d * math.log(w0 / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    factors = []
    for i in range(d // 2):
        interpolated = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep θ_i, 1: θ_i / s
        factors.append(1.0 / (interpolated / scale + (1.0 - interpolated)))
    return factors


def yarn_set(model: ModelInfo, window: int) -> FactorSet:
    s = _scale(model, window)
    return FactorSet(
        name=f"yarn-{window}", window=window, factors=yarn_factors(model, s), attention_scale=0.1 * math.log(s) + 1.0
    )


METHODS: dict[str, Callable[[ModelInfo, int], FactorSet]] = {"pi": pi_set, "ntk": ntk_set, "yarn": yarn_set}


def plain_set(model: ModelInfo) -> FactorSet:
    """Plain RoPE at the original window: the short rung of every baseline ladder."""
    return FactorSet(
        name="short",
        window=model.original_window,
        factors=[1.0] * (model.rotary_dim // 2),
        attention_scale=default_attention_scale(model.original_window, model.original_window),
    )


def baseline_ladder(model: ModelInfo, method: str, window: int) -> Ladder:
    """Two steps: plain RoPE up to W0, then the method's set up to ``window``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    long = METHODS[method](model, window).model_copy(update={"name": "long"})
    return Ladder(format_version=FORMAT_VERSION, model=model, sets=[plain_set(model), long])

