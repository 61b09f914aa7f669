"""Where the engine's ladder comes from, and the check that it fits the served model."""

from __future__ import annotations

import os
from typing import Any

from rope_ext.factors import Ladder, load_ladder
from rope_ext.hf_config import has_longrope, ladder_from_hf, model_info

FACTORS_ENV = "LONGROPE_FACTORS"


class LadderMismatch(ValueError):
    """The factor file was made for another model shape."""


def config_dict(hf_config: Any) -> dict[str, Any]:
    return hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)


def ladder_for_model(hf_config: Any) -> Ladder | None:
    """The factor file named by $LONGROPE_FACTORS, else the model's own longrope config, else None.

    A file that does not fit the model is refused here, naming what differs.
    """
    config = config_dict(hf_config)
    path = os.environ.get(FACTORS_ENV)
    if path:
        ladder = load_ladder(path)
        check_fits(ladder, config)
        return ladder
    if has_longrope(config):
        return ladder_from_hf(config)
    return None


def check_fits(ladder: Ladder, config: dict[str, Any]) -> None:
    served = model_info(config)
    made_for = ladder.model
    for field, want, have in (
        ("rotary_dim", made_for.rotary_dim, served.rotary_dim),
        ("original_window", made_for.original_window, served.original_window),
        ("rope_theta", made_for.rope_theta, served.rope_theta),
    ):
        if want != have:
            raise LadderMismatch(
                f"{os.environ.get(FACTORS_ENV, 'factor file')}: model.{field} is {want}, "
                f"but the served model has {field} {have}"
            )
