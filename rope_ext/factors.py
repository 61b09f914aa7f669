"""The factor-set file: one JSON document holding a model's ladder of RoPE factor sets.

The pydantic models below are the schema (``longrope factors schema`` prints it as JSON
Schema). Loading goes through :func:`load_ladder`, which turns every validation problem
into a :class:`FactorFileError` whose message starts with the dotted path of the bad field,
so a broken file is refused naming what is wrong.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FORMAT_VERSION = 1

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Factor = Annotated[float, Field(ge=1.0, allow_inf_nan=False)]


class FactorFileError(ValueError):
    """A factor file that cannot be used; the message names the field and why."""


def attention_scale_for(scale: float, original_window: int) -> float:
    """LongRoPE's attention scale for a stretch of ``scale`` = window / W0: sqrt(1 + ln(s) / ln(W0)), 1.0 when
    s <= 1. Transformers and vLLM use the same formula for a ``longrope`` config's shared attention factor."""
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(original_window))


def default_attention_scale(window: int, original_window: int) -> float:
    """The per-set default (docs/design.md): the formula at the set's own window."""
    return attention_scale_for(window / original_window, original_window)


class ModelInfo(BaseModel):
    """What the ladder was made for; the plugin refuses a model that does not match."""

    model_config = ConfigDict(extra="forbid")

    name: str
    rope_theta: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    rotary_dim: Annotated[int, Field(gt=0, multiple_of=2)]
    original_window: Annotated[int, Field(gt=0, description="W0: the context the model was trained on.")]


class FactorSet(BaseModel):
    """One rung of the ladder: the frequencies for sequences up to ``window`` tokens."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1)]
    window: Annotated[int, Field(gt=0, description="Longest sequence (prompt + generated) the set is meant for.")]
    factors: Annotated[list[Factor], Field(description="λ_i >= 1 per rotary frequency (rotary_dim / 2 values).")]
    n_hat: Annotated[int, Field(ge=0, description="Positions below n_hat keep plain, unscaled RoPE.")] = 0
    attention_scale: Annotated[
        float | None,
        Field(gt=0, allow_inf_nan=False, description="mscale; default sqrt(1 + ln(window/W0) / ln(W0))."),
    ] = None


class Ladder(BaseModel):
    """A model's factor sets ordered by window; the file's top-level object."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    model: ModelInfo
    sets: Annotated[list[FactorSet], Field(min_length=1)]

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if version != FORMAT_VERSION:
            raise ValueError(f"unknown format version {version}; this release reads version {FORMAT_VERSION}")
        return version

    @model_validator(mode="after")
    def _consistent(self) -> Ladder:
        info = self.model
        seen: set[str] = set()
        for i, fs in enumerate(self.sets):
            where = f"sets.{i}"
            if len(fs.factors) != info.rotary_dim // 2:
                raise ValueError(
                    f"{where}.factors: expected {info.rotary_dim // 2} factors (rotary_dim {info.rotary_dim} / 2), "
                    f"got {len(fs.factors)}"
                )
            if fs.name in seen:
                raise ValueError(f"{where}.name: duplicate set name {fs.name!r}")
            seen.add(fs.name)
            if fs.window < info.original_window:
                raise ValueError(
                    f"{where}.window: {fs.window} is below the original window W0 = {info.original_window}"
                )
            if i and fs.window <= self.sets[i - 1].window:
                raise ValueError(
                    f"{where}.window: windows must strictly increase ({self.sets[i - 1].window} then {fs.window})"
                )
            if fs.attention_scale is None:
                fs.attention_scale = default_attention_scale(fs.window, info.original_window)
        return self

    @property
    def names(self) -> list[str]:
        return [fs.name for fs in self.sets]

    @property
    def max_window(self) -> int:
        return self.sets[-1].window

    def index_of(self, name: str) -> int:
        """Position of the set called ``name``; KeyError names the sets that exist."""
        for i, fs in enumerate(self.sets):
            if fs.name == name:
                return i
        raise KeyError(f"no factor set named {shown(name)}; this ladder has {', '.join(self.names)}")


def shown(value: Any, limit: int = 64) -> str:
    """``repr(value)`` cut to ``limit`` characters: a client's value echoed in an error stays small."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def parse_ladder(data: Any) -> Ladder:
    """Validate a decoded JSON document; raise FactorFileError naming the first bad field."""
    try:
        return Ladder.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        msg = err["msg"].removeprefix("Value error, ")
        path = _field_path(err["loc"])
        if not path:  # model-level checks put the field path at the start of the message
            raise FactorFileError(msg) from None
        raise FactorFileError(f"{path}: {msg}") from None


def load_ladder(path: str | Path) -> Ladder:
    """Read and validate a factor file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise FactorFileError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise FactorFileError(f"{path}: not JSON: {exc}") from None
    try:
        return parse_ladder(data)
    except FactorFileError as exc:
        raise FactorFileError(f"{path}: {exc}") from None


def save_ladder(ladder: Ladder, path: str | Path) -> None:
    Path(path).write_text(ladder.model_dump_json(indent=2) + "\n")


def json_schema() -> dict[str, Any]:
    return Ladder.model_json_schema()
