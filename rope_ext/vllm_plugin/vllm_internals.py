"""Every private vLLM name the plugin relies on, in lists checked at start (`longrope serve`'s own list,
built from the same pieces, is ``server/vllm_internals.py``).

Porting to another vLLM starts from these lists: each entry says where a name lives and what
the plugin does with it. ``check_internals`` looks every one up when the plugin registers,
and ``check_runner_state`` checks the runner's per-step state once the model is loaded, so a vLLM
that moved or renamed one of them stops at start with that name instead of serving stock RoPE.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


class MissingInternal(RuntimeError):
    pass


@dataclass(frozen=True)
class Internal:
    module: str
    name: str  # dotted attribute path inside the module
    use: str  # what the plugin does with it


_RUNNER = "vllm.v1.worker.gpu_model_runner"  # the CPU runner subclasses this one

INTERNALS = (
    Internal("vllm.v1.engine.input_processor", "InputProcessor.__init__",
             "wraps it: refuses at start an engine the plugin cannot drive (engine_checks.py)"),
    Internal("vllm.config", "VllmConfig.use_v2_model_runner", "reads it: the V2 model runner is refused"),
    Internal("vllm.config", "ModelConfig.uses_mrope", "reads it: M-RoPE models are refused"),
    Internal("vllm.config", "ModelConfig.is_multimodal_model", "reads it: multimodal models are refused"),
    Internal("vllm.config", "ModelConfig.use_mla", "reads it: MLA (DeepSeek-style) models are refused"),
    Internal("vllm.config", "VllmConfig.speculative_config",
             "reads it: speculative decoding with a draft model is refused (its drafter keeps stock RoPE)"),
    Internal("vllm.config", "SpeculativeConfig.method", "reads it: ngram, ngram_gpu and suffix stay allowed"),
    Internal("vllm.v1.engine.input_processor", "InputProcessor.process_inputs",
             "wraps it: each engine request gets its set name and a per-set cache_salt"),
    Internal("vllm.config", "VllmConfig.compute_hash", "wraps it: the compile cache is keyed by the ladder"),
    Internal("vllm.config", "set_current_vllm_config", "enters it to build rotary modules after load"),
    Internal("vllm.v1.worker.cpu_worker", "CPUModelRunner", "replaces it with a subclass carrying the mixins (CPU)"),
    Internal(_RUNNER, "GPUModelRunner", "replaces it with a subclass carrying the mixin (CUDA)"),
    Internal(_RUNNER, "GPUModelRunner.load_model", "extends it: swaps the rotary modules, allocates offsets"),
    Internal(_RUNNER, "GPUModelRunner.get_model", "calls it: the model whose rotary modules are swapped"),
    Internal(_RUNNER, "GPUModelRunner._update_states", "extends it: forgets finished requests' sets"),
    Internal(_RUNNER, "GPUModelRunner._prepare_inputs", "extends it: fills the step's per-token offsets"),
    Internal(_RUNNER, "GPUModelRunner._model_forward", "extends it: adds the offsets to positions around the call"),
    Internal(_RUNNER, "GPUModelRunner._sample", "extends it on CPU: saves seeded generators' state"),
    Internal(_RUNNER, "GPUModelRunner._bookkeeping_sync", "extends it on CPU: rewinds discarded seeded generators"),
    Internal("vllm.model_executor.layers.rotary_embedding", "RotaryEmbedding._compute_cos_sin_cache",
             "overrides it: the table that stacks every set"),
    Internal("vllm.model_executor.layers.rotary_embedding.base", "RotaryEmbeddingBase",
             "swaps the model's modules of this type"),
    Internal("vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope",
             "Phi3LongRoPEScaledRotaryEmbedding", "swaps the model's modules of this type"),
    Internal("vllm.model_executor.layers.rotary_embedding.deepseek_scaling_rope", "DeepseekScalingRotaryEmbedding",
             "refuses models whose rotary modules are of this type (MLA's own mscale)"),
    Internal("vllm.utils.platform_utils", "is_pin_memory_available",
             "asks it before pinning the host side of the per-step offsets"),
)

# Checked by rope_ext.vllm_cli before it runs vLLM's CLI (not at every engine start: importing the
# CLI costs every process seconds).
CLI_INTERNALS = (
    Internal("vllm.entrypoints.cli.main", "main",
             "runs it after answering its importlib.metadata.version('vllm') lookup (rope_ext.vllm_cli)"),
)

# Read from the model runner every step (instance state, so checked once the model is loaded).
RUNNER_STATE = ("requests", "max_num_tokens", "input_batch.req_ids")
CPU_RUNNER_STATE = ("input_batch.generators", "input_batch.num_reqs", "discard_request_mask.np")


def _lookup(root: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def check_internals(internals: tuple[Internal, ...] = INTERNALS) -> None:
    """Raise MissingInternal naming the first entry this vLLM lacks."""
    for internal in internals:
        try:
            _lookup(importlib.import_module(internal.module), internal.name)
        except (ImportError, AttributeError) as exc:
            raise MissingInternal(
                f"longrope plugin: this vLLM has no {internal.module}.{internal.name} (the plugin {internal.use}): "
                f"{exc}. Every vLLM internal longrope-serve uses is listed in {__name__} and server.vllm_internals."
            ) from None


def check_runner_state(runner: Any, names: tuple[str, ...]) -> None:
    """Raise MissingInternal naming the first runner attribute this vLLM lacks."""
    for name in names:
        try:
            _lookup(runner, name)
        except AttributeError:
            raise MissingInternal(
                f"longrope plugin: {type(runner).__name__} has no {name}, which the plugin reads every step. "
                f"Every vLLM internal the plugin uses is listed in {__name__}."
            ) from None
