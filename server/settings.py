"""Server settings: one definition for flags and environment variables (prefix LONGROPE_)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from rope_ext.model_files import default_model_dir
from rope_ext.selection import Policy


class ServerSettings(BaseSettings):
    """Every field is a `longrope serve --flag` and a LONGROPE_FIELD environment variable."""

    model_config = SettingsConfigDict(env_prefix="LONGROPE_", protected_namespaces=())

    model: Path = Field(default_factory=default_model_dir, description="model directory (transformers layout)")
    factors: Path | None = Field(None, description="factor file; default: the shipped ladder or the model's config")
    served_model_name: str | None = Field(None, description="model id clients send (default: the directory name)")
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="accepted bearer keys (env: comma-separated)")
    rope_policy: Policy = Policy.DYNAMIC
    max_body_bytes: int = Field(2_000_000, description="larger request bodies get 413")
    drain_timeout: float = Field(30.0, description="seconds running requests may finish after SIGTERM")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name
