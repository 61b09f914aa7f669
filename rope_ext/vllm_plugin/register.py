"""Entry point of the ``vllm.general_plugins`` group; vLLM calls it in every process.

Idempotent (vLLM may call it more than once per process). ``LONGROPE_PLUGIN=0`` switches the
plugin off so stock vLLM behaviour returns (benchmarks compare both).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any

from rope_ext import environment
from rope_ext.factors import Ladder

SUPPORTED_VLLM = "0.32.0"


class UnsupportedVllm(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    base = version.split("+")[0]
    if base != SUPPORTED_VLLM:
        raise UnsupportedVllm(
            f"longrope-serve's vLLM plugin is built for vLLM {SUPPORTED_VLLM}, but vLLM {version} is installed; "
            f"install longrope-serve[cpu] or [gpu], or set {environment.PLUGIN}=0 to run stock vLLM"
        )


def _ladder_of(processor: Any) -> Ladder | None:
    """The processor's ladder, read once per processor."""
    from rope_ext.vllm_plugin.model_ladder import ladder_for_engine

    if not hasattr(processor, "_longrope_ladder"):
        processor._longrope_ladder = ladder_for_engine(processor.vllm_config)
    return processor._longrope_ladder


def _hash_with_ladder(compute_hash: Callable[..., str]) -> Callable[..., str]:
    """Key vLLM's compile cache by the ladder too.

    The ladder lives in a buffer of a module vLLM never traces by source, so without this a
    graph compiled for one ladder (or for stock vLLM) could be loaded for another.
    """
    from rope_ext.vllm_plugin.model_ladder import ladder_for_engine

    @functools.wraps(compute_hash)
    def compute_hash_with_ladder(self: Any, *args: Any, **kwargs: Any) -> str:
        ladder = ladder_for_engine(self) if self.model_config is not None else None
        digest = ladder.model_dump_json() if ladder is not None else "none"
        mixed = f"{compute_hash(self, *args, **kwargs)}|longrope:{digest}"
        return hashlib.sha256(mixed.encode()).hexdigest()[:10]

    compute_hash_with_ladder.__longrope__ = True  # type: ignore[attr-defined]
    return compute_hash_with_ladder


def _runner_with(base: type, *mixins: type) -> type:
    """``base`` with ``mixins`` in front, once (register may run again in the same process)."""
    if all(issubclass(base, mixin) for mixin in mixins):
        return base
    return type(f"LongRope{base.__name__}", (*mixins, base), {})


def register() -> None:
    if not environment.plugin_enabled():
        return
    import vllm

    check_vllm_version(vllm.__version__)
    from rope_ext.vllm_plugin.vllm_internals import check_internals

    check_internals()
    environment.default_to_v1_runner()  # the mixin hooks the V1 runner; engine_checks refuses an explicit V2
    if environment.factor_file():
        environment.allow_long_max_model_len()

    from vllm.config import VllmConfig
    from vllm.v1.engine.input_processor import InputProcessor

    from rope_ext.vllm_plugin.engine_checks import checked_at_start
    from rope_ext.vllm_plugin.request_sets import with_sets

    if not getattr(InputProcessor.__init__, "__longrope__", False):
        InputProcessor.__init__ = checked_at_start(InputProcessor.__init__)
    if not getattr(InputProcessor.process_inputs, "__longrope__", False):
        InputProcessor.process_inputs = with_sets(InputProcessor.process_inputs, _ladder_of)
    if not getattr(VllmConfig.compute_hash, "__longrope__", False):
        VllmConfig.compute_hash = _hash_with_ladder(VllmConfig.compute_hash)

    from vllm.platforms import current_platform

    from rope_ext.vllm_plugin.runner import PerRequestSetsMixin

    if current_platform.is_cpu():
        import vllm.v1.worker.cpu_worker as worker_module

        from rope_ext.vllm_plugin.cpu_generators import SeededCpuGeneratorsMixin

        worker_module.CPUModelRunner = _runner_with(
            worker_module.CPUModelRunner, PerRequestSetsMixin, SeededCpuGeneratorsMixin
        )
    else:
        import vllm.v1.worker.gpu_model_runner as runner_module

        runner_module.GPUModelRunner = _runner_with(runner_module.GPUModelRunner, PerRequestSetsMixin)
