"""Where the engine's ladder comes from, and the check that it fits the served model.

One source for every process: the factor file that `longrope serve` puts in vLLM's
``additional_config`` (it travels with the engine's config to every engine and worker
process), else ``$LONGROPE_FACTORS`` (plain ``vllm serve`` with the plugin), else the model's
own longrope config. Each is parsed once per process (a file by its path, a config by its RoPE
fields), and the server and the plugin in that process share the result.
"""

from __future__ import annotations

import functools
import json
import os
from argparse import Namespace
from pathlib import Path
from typing import Any

from rope_ext import environment
from rope_ext.factors import Ladder, load_ladder
from rope_ext.hf_config import LADDER_FIELDS, has_longrope, ladder_from_hf, model_info

CONFIG_KEY = "longrope_factors"  # in vLLM's additional_config


class LadderMismatch(ValueError):
    """The factor file was made for another model shape."""


def config_dict(hf_config: Any) -> dict[str, Any]:
    return hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)


@functools.lru_cache(maxsize=None)
def ladder_file(path: str) -> Ladder:
    """The factor file at ``path``, parsed once per process (a broken one raises, naming the field)."""
    return load_ladder(path)


def ladder_from_config(config: dict[str, Any]) -> Ladder | None:
    """The model's own longrope ladder (a Phi-3 style pair), or None."""
    if not has_longrope(config):
        return None
    return _ladder_from_fields(json.dumps({k: config[k] for k in LADDER_FIELDS if k in config}, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _ladder_from_fields(fields: str) -> Ladder:
    """Parsed once per process: vLLM asks for the ladder at every config hash and engine check."""
    return ladder_from_hf(json.loads(fields))


def ladder_for_model(hf_config: Any, factors: str | os.PathLike | None = None) -> Ladder | None:
    """``factors`` (else $LONGROPE_FACTORS), else the model's own longrope config, else None.

    A file that does not fit the model is refused here, naming what differs.
    """
    config = config_dict(hf_config)
    path = factors or environment.factor_file()
    if path:
        ladder = ladder_file(str(path))
        check_fits(ladder, config, path)
        return ladder
    return ladder_from_config(config)


def ladder_for_engine(vllm_config: Any) -> Ladder | None:
    """The ladder of the engine ``vllm_config`` describes, from the one source above."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    return ladder_for_model(vllm_config.model_config.hf_config, extra.get(CONFIG_KEY))


def carry_factors(args: Namespace, factors: Path) -> None:
    """Name ``factors`` in the engine's config (parsed serve ``args``), for every engine process."""
    args.additional_config = {**(args.additional_config or {}), CONFIG_KEY: str(factors)}
    environment.allow_long_max_model_len()


def check_fits(ladder: Ladder, config: dict[str, Any], source: str | os.PathLike = "factor file") -> None:
    served = model_info(config)
    made_for = ladder.model
    for field, want, have in (
        ("rotary_dim", made_for.rotary_dim, served.rotary_dim),
        ("original_window", made_for.original_window, served.original_window),
        ("rope_theta", made_for.rope_theta, served.rope_theta),
    ):
        if want != have:
            raise LadderMismatch(f"{source}: model.{field} is {want}, but the served model has {field} {have}")
