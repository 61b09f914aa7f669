"""Entry point of the ``vllm.general_plugins`` group; vLLM calls it in every process.

Idempotent (vLLM may call it more than once per process). ``LONGROPE_PLUGIN=0`` switches the
plugin off so stock vLLM behaviour returns (benchmarks compare both).

vLLM calls plugins without catching their errors, so nothing here may stop vLLM for a model the plugin
does not serve: on a vLLM it does not support, the plugin hooks only the engine check, which refuses an
engine with a ladder (naming the supported versions) and lets every other engine start. On a supported
vLLM it hooks both model runners (vLLM picks one per engine, and the plugin follows its choice):
V1 where that runner still exists, V2 always (runners.py).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any

from vllm.logger import init_logger

from rope_ext import environment
from rope_ext.factors import Ladder
from rope_ext.vllm_plugin.vllm_internals import (
    INTERNALS,
    SUPPORTED_VLLM,
    V1_RUNNER_INTERNALS,
    V2_RUNNER_INTERNALS,
    applies,
    base_version,
    check_internals,
    check_supported,
    listed,
)

logger = init_logger("vllm.longrope")  # a child of vLLM's logger, so vLLM's logging prints it


def _ladder_of(processor: Any) -> Ladder | None:
    """The processor's ladder, read once per processor."""
    from rope_ext.vllm_plugin.model_ladder import ladder_for_engine

    if not hasattr(processor, "_longrope_ladder"):
        processor._longrope_ladder = ladder_for_engine(processor.vllm_config)
    return processor._longrope_ladder


def _ladder_digest(vllm_config: Any) -> str:
    from rope_ext.vllm_plugin.model_ladder import ladder_for_engine

    ladder = ladder_for_engine(vllm_config) if vllm_config.model_config is not None else None
    return ladder.model_dump_json() if ladder is not None else "none"


def _hash_with_ladder(compute_hash: Callable[..., str]) -> Callable[..., str]:
    """Key vLLM's compile cache by the ladder too (vLLM 0.32, 0.33: ``VllmConfig.compute_hash``).

    The ladder lives in a buffer of a module vLLM never traces by source, so without this a
    graph compiled for one ladder (or for stock vLLM) could be loaded for another.
    """

    @functools.wraps(compute_hash)
    def compute_hash_with_ladder(self: Any, *args: Any, **kwargs: Any) -> str:
        mixed = f"{compute_hash(self, *args, **kwargs)}|longrope:{_ladder_digest(self)}"
        return hashlib.sha256(mixed.encode()).hexdigest()[:10]

    compute_hash_with_ladder.__longrope__ = True  # type: ignore[attr-defined]
    return compute_hash_with_ladder


def _factors_with_ladder(compile_factors: Callable[..., dict]) -> Callable[..., dict]:
    """The same for vLLM 0.34, whose compile cache hashes ``VllmConfig.compile_factors()`` (a dict)."""

    @functools.wraps(compile_factors)
    def compile_factors_with_ladder(self: Any, *args: Any, **kwargs: Any) -> dict:
        return {**compile_factors(self, *args, **kwargs), "longrope": _ladder_digest(self)}

    compile_factors_with_ladder.__longrope__ = True  # type: ignore[attr-defined]
    return compile_factors_with_ladder


def _wrap_once(owner: Any, name: str, wrap: Callable[[Any], Any]) -> None:
    """``owner.name = wrap(owner.name)``, unless register already did it in this process."""
    if not getattr(getattr(owner, name), "__longrope__", False):
        setattr(owner, name, wrap(getattr(owner, name)))


def _runner_with(base: type, *mixins: type) -> type:
    """``base`` with ``mixins`` in front, once (register may run again in the same process)."""
    if all(issubclass(base, mixin) for mixin in mixins):
        return base
    return type(f"LongRope{base.__name__}", (*mixins, base), {})


def _hook_v1_runner() -> None:
    from vllm.platforms import current_platform

    from rope_ext.vllm_plugin.runners import PerRequestSetsRunner

    check_internals(V1_RUNNER_INTERNALS)
    if current_platform.is_cpu():
        import vllm.v1.worker.cpu_worker as worker_module

        from rope_ext.vllm_plugin.cpu_generators import SeededCpuGeneratorsMixin

        worker_module.CPUModelRunner = _runner_with(
            worker_module.CPUModelRunner, PerRequestSetsRunner, SeededCpuGeneratorsMixin
        )
    else:
        import vllm.v1.worker.gpu_model_runner as runner_module

        runner_module.GPUModelRunner = _runner_with(runner_module.GPUModelRunner, PerRequestSetsRunner)


def _hook_v2_runner() -> None:
    import vllm.v1.worker.gpu.model_states as model_states

    from rope_ext.vllm_plugin.runners import state_class_with_sets

    check_internals(V2_RUNNER_INTERNALS)
    _wrap_once(model_states, "resolve_model_state_cls", state_class_with_sets)


def _refuse_when_acting(version: str) -> None:
    """On an unsupported vLLM: an engine with a ladder is refused at start, any other one starts untouched."""
    from rope_ext.vllm_plugin.engine_checks import refusing_unsupported_vllm

    try:
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError:  # no engine check to hook: refuse now only if a ladder was asked for
        if environment.factor_file():
            check_supported(version)
        logger.info("longrope plugin: vLLM %s is not one it supports (%s); stepping aside", version,
                    ", ".join(SUPPORTED_VLLM))
        return
    _wrap_once(InputProcessor, "__init__", functools.partial(refusing_unsupported_vllm, version=version))


def register() -> None:
    if not environment.plugin_enabled():
        return
    import vllm

    version = base_version(vllm.__version__)
    if version not in SUPPORTED_VLLM:
        _refuse_when_acting(vllm.__version__)
        return
    check_internals(INTERNALS)
    if environment.factor_file():
        environment.allow_long_max_model_len()

    from vllm.config import VllmConfig
    from vllm.v1.engine.input_processor import InputProcessor

    from rope_ext.vllm_plugin.engine_checks import checked_at_start
    from rope_ext.vllm_plugin.request_sets import with_sets

    _wrap_once(InputProcessor, "__init__", checked_at_start)
    _wrap_once(InputProcessor, "process_inputs", functools.partial(with_sets, ladder_of=_ladder_of))
    if applies(listed("VllmConfig.compile_factors"), version):
        _wrap_once(VllmConfig, "compile_factors", _factors_with_ladder)
    else:
        _wrap_once(VllmConfig, "compute_hash", _hash_with_ladder)
    if any(applies(internal, version) for internal in V1_RUNNER_INTERNALS):
        _hook_v1_runner()
    _hook_v2_runner()
