"""Engines the plugin refuses at start, each refusal naming the setting to change.

Checked when vLLM builds its input processor: before any worker starts, and in the process
whose error reaches the user first. Each case would otherwise serve silently wrong results:
the API side would name sets that no worker applies, or offsets would shift positions the
plugin does not understand.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from vllm.logger import init_logger

from rope_ext import environment
from rope_ext.vllm_plugin.model_ladder import ladder_for_engine
from rope_ext.vllm_plugin.vllm_internals import check_supported

logger = init_logger("vllm.longrope")  # a child of vLLM's logger, so vLLM's logging prints it


class UnsupportedEngine(RuntimeError):
    pass


# Speculative methods that propose drafts without a model (no rotary of their own): they stay allowed.
MODEL_FREE_SPECULATION = ("ngram", "ngram_gpu", "suffix")


def check_engine(vllm_config: Any) -> None:
    """Raise UnsupportedEngine when this engine cannot rotate each request with its own set."""
    model_config = vllm_config.model_config
    if model_config is None:
        return
    if ladder_for_engine(vllm_config) is None:
        logger.info("longrope plugin: %s has no ladder (no %s, no longrope config in the model): stock vLLM serves it",
                    model_config.model, environment.FACTORS)
        return
    if model_config.uses_mrope or model_config.is_multimodal_model:
        raise UnsupportedEngine(
            f"longrope plugin: {model_config.model} is multimodal or uses M-RoPE (3-D positions); the plugin shifts "
            "1-D text positions only. Serve it without a ladder (unset LONGROPE_FACTORS and drop the model's "
            "longrope rope_scaling) or switch the plugin off with LONGROPE_PLUGIN=0"
        )
    if model_config.use_mla:
        raise UnsupportedEngine(
            f"longrope plugin: {model_config.model} uses multi-head latent attention (MLA, DeepSeek-style), whose "
            "rotary applies its own YaRN mscale; the plugin has not been proven on it. Serve it without a ladder "
            f"(unset {environment.FACTORS}) or switch the plugin off with {environment.PLUGIN}=0"
        )
    speculative = vllm_config.speculative_config
    if speculative is not None and speculative.method not in MODEL_FREE_SPECULATION:
        raise UnsupportedEngine(
            f"longrope plugin: speculative decoding with a draft model (method {speculative.method!r}) is not "
            "supported: the drafter keeps stock RoPE and would propose every non-default set's drafts with the wrong "
            f"rotation. Use a model-free method ({', '.join(MODEL_FREE_SPECULATION)}), drop --speculative-config, "
            f"or switch the plugin off with {environment.PLUGIN}=0"
        )
    if vllm_config.parallel_config.prefill_context_parallel_size > 1:
        raise UnsupportedEngine(
            "longrope plugin: prefill context parallelism (--prefill-context-parallel-size "
            f"{vllm_config.parallel_config.prefill_context_parallel_size}) splits a request's tokens across ranks, "
            "and the plugin has not been proven on it. Drop it, or switch the plugin off with "
            f"{environment.PLUGIN}=0"
        )


def checked_at_start(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap ``InputProcessor.__init__`` so an unsupported engine stops before its workers start."""

    @functools.wraps(init)
    def init_checked(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        check_engine(vllm_config)
        init(self, vllm_config, *args, **kwargs)

    init_checked.__longrope__ = True  # type: ignore[attr-defined]
    return init_checked


def refusing_unsupported_vllm(init: Callable[..., None], version: str) -> Callable[..., None]:
    """Wrap ``InputProcessor.__init__`` on a vLLM the plugin does not support: refuse an engine with a ladder
    (the plugin would have to act on it), let any other start as stock vLLM."""

    @functools.wraps(init)
    def init_unless_acting(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        try:
            acting = ladder_for_engine(vllm_config) is not None
        except AttributeError:  # a config we cannot read: a factor file still says a ladder was asked for
            acting = environment.factor_file() is not None
        if acting:
            check_supported(version)
        logger.info("longrope plugin: vLLM %s is not one it supports, and this engine has no ladder: stock vLLM "
                    "serves it", version)
        init(self, vllm_config, *args, **kwargs)

    init_unless_acting.__longrope__ = True  # type: ignore[attr-defined]
    return init_unless_acting
