"""The served model: vLLM's async engine with our plugin, its tokenizer and its ladder."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rope_ext.factors import Ladder, load_ladder
from rope_ext.model_files import DEFAULT_LADDER, default_model_dir
from rope_ext.vllm_plugin.model_ladder import FACTORS_ENV, ladder_for_model
from server.settings import ServerSettings

logger = logging.getLogger("longrope.server")


def resolve_factors(settings: ServerSettings) -> Path | None:
    """--factors, else the shipped ladder when serving the default model, else None (the model's config)."""
    if settings.factors:
        return settings.factors
    if settings.model.resolve() == default_model_dir().resolve():
        return DEFAULT_LADDER
    return None


def export_factors(settings: ServerSettings) -> None:
    """Check the factor file (a broken one raises, naming the field) and name it in $LONGROPE_FACTORS.

    Runs before vLLM's engine arguments are parsed: that already loads vLLM's plugins, and ours
    reads the variable when it registers (in this process and every engine process).
    """
    factors = resolve_factors(settings)
    if factors is not None:
        load_ladder(factors)
        os.environ[FACTORS_ENV] = str(factors)
    else:
        os.environ.pop(FACTORS_ENV, None)


def build_engine_args(settings: ServerSettings, engine_argv: list[str]) -> Any:
    """vLLM's AsyncEngineArgs from the flags `longrope serve` did not claim (parallelism, dtype, ...)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm.platforms import current_platform

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="longrope serve"))
    # float32 on CPU: vLLM's CPU default, bfloat16 with torch.compile, flips close first tokens
    # (SmolLM2 answers "L'Étoile…" instead of "Paris"). A --dtype flag still wins: the last one counts.
    defaults = ["--dtype", "float32"] if current_platform.is_cpu() else []
    args = parser.parse_args(["--model", str(settings.model), *defaults, *engine_argv])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    engine_args.served_model_name = settings.model_name
    engine_args.disable_log_stats = False  # /metrics shows the engine's counters
    return engine_args


class ServedModel:
    """Starts the engine off the event loop so /health can say 503 while it loads.

    ``on_start_failure`` (set by the serve command) is called when the engine cannot start: the
    server then stops and the process exits non-zero, instead of answering 503 forever.
    """

    def __init__(self, settings: ServerSettings, engine_args: Any):
        self.settings = settings
        self.engine_args = engine_args
        self.on_start_failure: Callable[[], None] | None = None
        self.engine: Any = None
        self.tokenizer: Any = None
        self.ladder: Ladder | None = None
        self.max_model_len = 0
        self.start_error: BaseException | None = None

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.engine.errored

    def _build(self) -> None:
        from transformers import AutoConfig, AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        ladder = ladder_for_model(AutoConfig.from_pretrained(self.settings.model))
        if ladder is None:
            raise ValueError(f"{self.settings.model} has no longrope config; give a factor file with --factors")
        if self.engine_args.max_model_len is None:
            self.engine_args.max_model_len = ladder.max_window
        self.tokenizer = AutoTokenizer.from_pretrained(self.settings.model)
        self.ladder = ladder
        self.max_model_len = self.engine_args.max_model_len
        self.engine = AsyncLLM.from_engine_args(self.engine_args)

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._build)
            logger.info("engine ready: %s, sets %s", self.settings.model_name, self.ladder.names)
        except Exception as exc:  # noqa: BLE001 - logged, then the process exits non-zero
            self.start_error = exc
            logger.exception("engine failed to start")
            if self.on_start_failure is not None:
                self.on_start_failure()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
