"""Hugging Face configs in and out: a ``longrope`` config is a two-step ladder.

Transformers v4 keeps the parameters in ``rope_scaling`` (type ``longrope`` or its old name
``su``) with ``rope_theta`` and ``original_max_position_embeddings`` at the top level;
v5 keeps them all in ``rope_parameters``. Both are read. The attention factor is kept
exactly as transformers and vLLM compute it (one value for both sets unless
``short_mscale`` / ``long_mscale`` say otherwise), so an imported model behaves as it does there.
"""

from __future__ import annotations

from typing import Any

from rope_ext.factors import FORMAT_VERSION, FactorFileError, Ladder, ModelInfo, attention_scale_for, parse_ladder

LONGROPE_TYPES = ("longrope", "su")
# The config keys a ladder is read from (model_info and ladder_from_hf read nothing else).
LADDER_FIELDS = ("rope_parameters", "rope_scaling", "rope_theta", "head_dim", "hidden_size", "num_attention_heads",
                 "partial_rotary_factor", "original_max_position_embeddings", "max_position_embeddings",
                 "_name_or_path", "model_type")


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE parameter dict of a config, whichever key and transformers version wrote it."""
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def rope_type(config: dict[str, Any]) -> str:
    params = rope_parameters(config)
    return params.get("rope_type") or params.get("type") or "default"


def model_info(config: dict[str, Any], name: str = "") -> ModelInfo:
    """Theta, rotary dim and W0 of a model, from its config."""
    params = rope_parameters(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    w0 = (
        params.get("original_max_position_embeddings")
        or config.get("original_max_position_embeddings")
        or config["max_position_embeddings"]
    )
    return ModelInfo(
        name=name or config.get("_name_or_path") or config.get("model_type", "unknown"),
        rope_theta=params.get("rope_theta") or config.get("rope_theta", 10000.0),
        rotary_dim=int(head_dim * partial),
        original_window=w0,
    )


def has_longrope(config: dict[str, Any]) -> bool:
    return rope_type(config) in LONGROPE_TYPES


def ladder_from_hf(config: dict[str, Any], name: str = "") -> Ladder:
    """Import a ``longrope`` config as a two-step ladder: short at W0, long at max_position_embeddings."""
    params = rope_parameters(config)
    kind = rope_type(config)
    if kind not in LONGROPE_TYPES:
        raise FactorFileError(f"rope_scaling.type: expected 'longrope' or 'su', got {kind!r}")
    for key in ("short_factor", "long_factor"):
        if key not in params:
            raise FactorFileError(f"rope_scaling.{key}: missing")
    info = model_info(config, name)
    w0 = info.original_window
    long_window = config["max_position_embeddings"]
    factor = params.get("factor") or long_window / w0
    shared = params.get("attention_factor")
    if shared is None:
        shared = attention_scale_for(factor, w0)
    data = {
        "format_version": FORMAT_VERSION,
        "model": info.model_dump(),
        "sets": [
            {
                "name": "short",
                "window": w0,
                "factors": params["short_factor"],
                "attention_scale": params.get("short_mscale") or shared,
            },
            {
                "name": "long",
                "window": long_window,
                "factors": params["long_factor"],
                "attention_scale": params.get("long_mscale") or shared,
            },
        ],
    }
    return parse_ladder(data)


def ladder_to_hf(ladder: Ladder) -> dict[str, Any]:
    """A two-step ladder as HF config keys: ``max_position_embeddings`` and v5 ``rope_parameters``."""
    if len(ladder.sets) != 2:
        raise ValueError(f"HF longrope configs hold exactly two sets; this ladder has {len(ladder.sets)}")
    short, long = ladder.sets
    if short.window != ladder.model.original_window:
        raise ValueError(f"sets.0.window: HF longrope needs the short set at W0 = {ladder.model.original_window}")
    for i, fs in enumerate(ladder.sets):
        if fs.n_hat:
            raise ValueError(f"sets.{i}.n_hat: HF longrope has no n_hat; it must be 0, not {fs.n_hat}")
    params: dict[str, Any] = {
        "rope_type": "longrope",
        "rope_theta": ladder.model.rope_theta,
        "original_max_position_embeddings": ladder.model.original_window,
        "short_factor": list(short.factors),
        "long_factor": list(long.factors),
    }
    if short.attention_scale == long.attention_scale:
        params["attention_factor"] = short.attention_scale
    else:  # transformers reads one attention factor only; vLLM honours the per-set mscales
        params["short_mscale"] = short.attention_scale
        params["long_mscale"] = long.attention_scale
    return {"max_position_embeddings": long.window, "rope_parameters": params}
