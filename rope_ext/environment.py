"""Every environment variable longrope-serve reads or sets, named and parsed here.

The plugin is configured by the environment because vLLM starts its engine and worker processes
itself: a variable set in the server's process reaches them all, a Python argument does not.
"""

from __future__ import annotations

import os
from pathlib import Path

PLUGIN = "LONGROPE_PLUGIN"  # 0/false/off/no: stock vLLM (the plugin stays out of the way)
FACTORS = "LONGROPE_FACTORS"  # the factor file of plain `vllm serve` with the plugin
MODEL_DIR = "LONGROPE_MODEL_DIR"  # where `longrope prepare-model` puts the default model
BOOKS_DIR = "LONGROPE_BOOKS_DIR"  # the public-domain books of the evaluations (default: data/books)
SERVE_PREFIX = "LONGROPE_"  # LONGROPE_<DEST> sets any `longrope serve` flag (server/serve.py)
CACHE_HOME = "XDG_CACHE_HOME"  # where the user's caches live (default ~/.cache)
# vLLM's own variables: the plugin sets the first when it is unset; the selftest sizes its CPU engines' KV cache
# with the second.
LONG_MAX_MODEL_LEN = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"
CPU_KV_CACHE_GIB = "VLLM_CPU_KVCACHE_SPACE"

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_switch(value: str) -> bool:
    """A true/false setting in any of the usual words; anything else is an error naming them."""
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{value!r} is neither true ({', '.join(TRUE_WORDS)}) nor false ({', '.join(FALSE_WORDS)})")


def plugin_enabled() -> bool:
    return parse_switch(os.environ.get(PLUGIN, "1"))


def factor_file() -> str | None:
    return os.environ.get(FACTORS) or None


def model_dir() -> Path | None:
    value = os.environ.get(MODEL_DIR)
    return Path(value) if value else None


def user_cache() -> Path:
    """longrope-serve's folder in the user's cache, shared by every checkout (the model, vLLM's wheels)."""
    return Path(os.environ.get(CACHE_HOME) or Path.home() / ".cache") / "longrope-serve"


def books_dir(default: Path) -> Path:
    value = os.environ.get(BOOKS_DIR)
    return Path(value) if value else default


def allow_long_max_model_len() -> None:
    """A plain model's config stops at W0; a factor file's sets carry it to max_model_len, which vLLM
    refuses past the config unless this is set."""
    os.environ.setdefault(LONG_MAX_MODEL_LEN, "1")
