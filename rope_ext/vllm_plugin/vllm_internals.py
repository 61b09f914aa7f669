"""Every vLLM name the plugin relies on, with the vLLM versions that have it: the plugin's porting surface.

`longrope serve`'s own list, built from the same pieces, is ``server/vllm_internals.py``. Porting to another
vLLM starts here: each entry says where a name lives, what the plugin does with it, the parameters the
plugin passes or takes by name, and the versions it holds for. What moved or was renamed between
versions (the V1 model runner, deleted in 0.34; ``compute_hash``, renamed ``compile_factors`` in 0.34) is
written here once, as entries with their versions, and the code asks :func:`applies` which one it has.

Two checks read these lists. At start, ``check_internals`` imports and looks up every entry of the running
version (the runner lists when that runner is used), so a vLLM that moved a name stops naming it instead of
serving stock RoPE. Without importing anything, ``rope_ext.porting_surface`` (``longrope check-vllm``) reads a
vLLM source tree or wheel of any version and confirms every entry of that version and its parameters.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

SUPPORTED_VLLM = ("0.32.0", "0.33.0", "0.34.0")
V1_RUNNER_VERSIONS = ("0.32.0", "0.33.0")  # vLLM 0.34 deleted the V1 model runner


class MissingInternal(RuntimeError):
    pass


class UnsupportedVllm(RuntimeError):
    pass


@dataclass(frozen=True)
class Internal:
    module: str
    name: str  # dotted attribute path inside the module
    use: str  # what longrope-serve does with it
    params: tuple[str, ...] = ()  # parameters passed or taken by name: each must be in its signature
    versions: tuple[str, ...] = SUPPORTED_VLLM
    attribute: bool = False  # an instance's attribute or field: only the source check can see it on the class

    @property
    def where(self) -> str:
        return f"{self.module}.{self.name}"


def base_version(version: str) -> str:
    """``0.32.0+cpu`` → ``0.32.0``: a local build is its release."""
    return version.split("+")[0]


def installed_version() -> str:
    import vllm

    return base_version(vllm.__version__)


def check_supported(version: str) -> None:
    if base_version(version) not in SUPPORTED_VLLM:
        raise UnsupportedVllm(
            f"longrope-serve's vLLM plugin supports vLLM {', '.join(SUPPORTED_VLLM)}, but vLLM {version} is "
            "installed; install longrope-serve[cpu] or [gpu], or set LONGROPE_PLUGIN=0 to run stock vLLM"
        )


def applies(internal: Internal, version: str | None = None) -> bool:
    """Whether ``internal`` is part of vLLM ``version`` (default: the installed one)."""
    return base_version(version or installed_version()) in internal.versions


def listed(name: str, internals: tuple[Internal, ...] | None = None) -> Internal:
    """The entry called ``name`` (in ``internals``, default the plugin's list)."""
    for internal in INTERNALS if internals is None else internals:
        if internal.name == name:
            return internal
    raise KeyError(f"{name} is not listed in {__name__}")


def lookup(internal: Internal) -> Any:
    """The object ``internal`` names, imported from the installed vLLM."""
    root: Any = importlib.import_module(internal.module)
    for part in internal.name.split("."):
        root = getattr(root, part)
    return root


def _missing_params(target: Any, params: tuple[str, ...]) -> list[str]:
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to compare
        return []
    return [p for p in params if p not in signature.parameters]


def check_internals(internals: tuple[Internal, ...], version: str | None = None) -> None:
    """Raise MissingInternal naming the first entry of this vLLM version that is absent or lost a parameter.

    Instance attributes are left to the source check (they exist on instances, not on the class).
    """
    version = version or installed_version()
    for internal in internals:
        if internal.attribute or not applies(internal, version):
            continue
        try:
            target = lookup(internal)
        except (ImportError, AttributeError) as exc:
            raise MissingInternal(
                f"longrope: vLLM {version} has no {internal.where} (longrope {internal.use}): {exc}. Every vLLM "
                f"internal longrope-serve uses is listed in {__name__} and server.vllm_internals."
            ) from None
        missing = _missing_params(target, internal.params)
        if missing:
            raise MissingInternal(
                f"longrope: vLLM {version}'s {internal.where} has no parameter {', '.join(missing)} "
                f"(longrope {internal.use})"
            )


def check_runner_state(runner: Any, names: tuple[str, ...]) -> None:
    """Raise MissingInternal naming the first runner attribute this vLLM lacks."""
    for name in names:
        try:
            root = runner
            for part in name.split("."):
                root = getattr(root, part)
        except AttributeError:
            raise MissingInternal(
                f"longrope plugin: {type(runner).__name__} has no {name}, which the plugin reads every step. "
                f"Every vLLM internal the plugin uses is listed in {__name__}."
            ) from None


def _attribute(module: str, name: str, use: str, versions: tuple[str, ...] = SUPPORTED_VLLM) -> Internal:
    return Internal(module, name, use, versions=versions, attribute=True)


_ROTARY = "vllm.model_executor.layers.rotary_embedding"

# Used in every vLLM process: looked up when the plugin registers.
INTERNALS = (
    Internal("vllm.v1.engine.input_processor", "InputProcessor.__init__",
             "wraps it: refuses at start an engine the plugin cannot drive (engine_checks.py)", ("vllm_config",)),
    Internal("vllm.v1.engine.input_processor", "InputProcessor.process_inputs",
             "wraps it: each engine request gets its set index and a per-set cache_salt (request_sets.py)"),
    _attribute("vllm.v1.engine.input_processor", "InputProcessor.vllm_config", "reads it: the engine's ladder"),
    _attribute("vllm.v1.engine", "EngineCoreRequest.prompt_token_ids", "reads it: the prompt's length"),
    _attribute("vllm.v1.engine", "EngineCoreRequest.sampling_params", "reads and writes its extra_args"),
    _attribute("vllm.v1.engine", "EngineCoreRequest.cache_salt", "writes it: the prefix cache is salted by set"),
    _attribute("vllm.sampling_params", "SamplingParams.extra_args", "carries the set's name and index"),
    _attribute("vllm.sampling_params", "SamplingParams.max_tokens", "reads it: the budget rule"),
    Internal("vllm.config", "VllmConfig.compute_hash", "wraps it: the compile cache is keyed by the ladder",
             versions=V1_RUNNER_VERSIONS),
    Internal("vllm.config", "VllmConfig.compile_factors", "wraps it: the compile cache is keyed by the ladder",
             versions=("0.34.0",)),
    _attribute("vllm.config", "VllmConfig.model_config", "reads it"),
    _attribute("vllm.entrypoints.llm", "LLM.llm_engine", "reads its config (the selftest's engine run)"),
    _attribute("vllm.v1.engine.llm_engine", "LLMEngine.vllm_config", "reads it (the selftest's engine run)"),
    Internal("vllm.config", "VllmConfig.use_v2_model_runner",
             "reads it: which model runner vLLM picked (the selftest says which one it proved)",
             versions=V1_RUNNER_VERSIONS),
    _attribute("vllm.config", "VllmConfig.additional_config", "carries `longrope serve`'s factor file"),
    _attribute("vllm.config", "VllmConfig.speculative_config",
             "reads it: speculative decoding with a draft model is refused (its drafter keeps stock RoPE)"),
    _attribute("vllm.config", "VllmConfig.parallel_config", "reads it: prefill context parallelism is refused"),
    _attribute("vllm.config", "ParallelConfig.prefill_context_parallel_size",
             "reads it: prefill context parallelism is refused (it splits a request's tokens across ranks)"),
    _attribute("vllm.config", "SpeculativeConfig.method", "reads it: ngram, ngram_gpu and suffix stay allowed"),
    _attribute("vllm.config", "ModelConfig.hf_config", "reads it: the model's shape and its own longrope config"),
    _attribute("vllm.config", "ModelConfig.model", "names the model in refusals"),
    _attribute("vllm.config", "ModelConfig.max_model_len", "reads it: the rows of each set in the stacked table"),
    _attribute("vllm.config", "ModelConfig.dtype", "reads it: the table's dtype"),
    Internal("vllm.config", "ModelConfig.uses_mrope", "reads it: M-RoPE models are refused"),
    Internal("vllm.config", "ModelConfig.is_multimodal_model", "reads it: multimodal models are refused"),
    Internal("vllm.config", "ModelConfig.use_mla", "reads it: MLA (DeepSeek-style) models are refused"),
    Internal("vllm.config", "set_current_vllm_config", "enters it to build rotary modules after load",
             ("vllm_config",)),
    Internal(_ROTARY, "RotaryEmbedding.__init__", "subclasses it: the table that stacks every set",
             ("head_size", "rotary_dim", "max_position_embeddings", "base", "is_neox_style", "dtype")),
    Internal(_ROTARY, "RotaryEmbedding._compute_cos_sin_cache", "overrides it: the table that stacks every set"),
    Internal(f"{_ROTARY}.base", "RotaryEmbeddingBase", "swaps the model's modules of this type"),
    _attribute(f"{_ROTARY}.base", "RotaryEmbeddingBase.head_size", "reads it: the swapped-in module's head size"),
    _attribute(f"{_ROTARY}.base", "RotaryEmbeddingBase.rotary_dim", "reads it: refuses a ladder of other dims"),
    _attribute(f"{_ROTARY}.base", "RotaryEmbeddingBase.is_neox_style", "reads it: the swapped-in module's layout"),
    Internal(f"{_ROTARY}.phi3_long_rope_scaled_rope", "Phi3LongRoPEScaledRotaryEmbedding",
             "swaps the model's modules of this type"),
    Internal(f"{_ROTARY}.deepseek_scaling_rope", "DeepseekScalingRotaryEmbedding",
             "refuses models whose rotary modules are of this type (MLA's own mscale)"),
    Internal("vllm.utils.platform_utils", "is_pin_memory_available",
             "asks it before pinning the host side of V1's per-step offsets"),
)

_V1 = "vllm.v1.worker.gpu_model_runner"  # the CPU runner subclasses this one
_V1_ONLY = V1_RUNNER_VERSIONS

# The V1 model runner (runners.PerRequestSetsRunner, cpu_generators): looked up when register hooks it.
V1_RUNNER_INTERNALS = (
    Internal("vllm.v1.worker.cpu_worker", "CPUModelRunner", "replaces it with a subclass carrying the mixins (CPU)",
             versions=_V1_ONLY),
    Internal(_V1, "GPUModelRunner", "replaces it with a subclass carrying the mixin (CUDA)", versions=_V1_ONLY),
    Internal(_V1, "GPUModelRunner.load_model", "extends it: swaps the rotary modules, allocates offsets",
             versions=_V1_ONLY),
    Internal(_V1, "GPUModelRunner.get_model", "calls it: the model whose rotary modules are swapped",
             versions=_V1_ONLY),
    Internal(_V1, "GPUModelRunner._update_states", "extends it: forgets finished requests' sets",
             ("scheduler_output",), _V1_ONLY),
    Internal(_V1, "GPUModelRunner._prepare_inputs", "extends it: fills the step's per-token offsets",
             ("scheduler_output", "num_scheduled_tokens"), _V1_ONLY),
    Internal(_V1, "GPUModelRunner._model_forward", "extends it: adds the offsets to positions around the call",
             ("input_ids", "positions"), _V1_ONLY),
    Internal(_V1, "GPUModelRunner._sample", "extends it on CPU: saves seeded generators' state", versions=_V1_ONLY),
    Internal(_V1, "GPUModelRunner._bookkeeping_sync", "extends it on CPU: rewinds discarded seeded generators",
             versions=_V1_ONLY),
    _attribute("vllm.v1.core.sched.output", "SchedulerOutput.finished_req_ids", "reads it: requests to forget",
               _V1_ONLY),
)
# Read from the V1 model runner every step (instance state, so checked once the model is loaded).
V1_RUNNER_STATE = ("requests", "max_num_tokens", "device", "vllm_config", "input_batch.req_ids")
CPU_RUNNER_STATE = ("input_batch.generators", "input_batch.num_reqs", "discard_request_mask.np")

_V2 = "vllm.v1.worker.gpu"
_STATE = f"{_V2}.model_states.interface"
_BATCH = f"{_V2}.input_batch"

# The V2 model runner (runners.PerRequestSetsState): looked up when register hooks it.
V2_RUNNER_INTERNALS = (
    Internal(f"{_V2}.model_states", "resolve_model_state_cls",
             "wraps it: an engine with a ladder gets the default model state with its sets mixed in",
             ("vllm_config", "model")),
    Internal(f"{_V2}.model_states", "init_model_state", "calls the above by its module name (so the wrapper is seen)"),
    Internal(f"{_V2}.model_states.default", "DefaultModelState", "mixes the sets into it (the only state it takes)"),
    Internal(_STATE, "ModelState.__init__", "extends it: swaps the rotary modules, allocates the shifted positions",
             ("vllm_config", "model", "encoder_cache", "device")),
    _attribute(_STATE, "ModelState.max_num_reqs", "reads it: one set start per request slot"),
    _attribute(_STATE, "ModelState.max_num_tokens", "reads it: the shifted positions' size"),
    Internal(_STATE, "ModelState.add_request", "extends it: the request's set start", ("req_index", "new_req_data")),
    Internal(_STATE, "ModelState.apply_staged_writes", "extends it: publishes the set starts to the device"),
    Internal(_STATE, "ModelState.prepare_inputs", "extends it: the model is called with shifted positions",
             ("input_batch", "req_states")),
    Internal(_STATE, "ModelState.prepare_dummy_inputs", "extends it: dummy runs and CUDA graphs read the same buffer",
             ("num_reqs", "num_tokens")),
    Internal(f"{_V2}.buffer_utils", "UvaBackedTensor.__init__", "builds one: the set start of each request slot",
             ("size", "dtype")),
    Internal(f"{_V2}.buffer_utils", "UvaBackedTensor.copy_to_uva", "calls it: publishes the set starts"),
    _attribute(f"{_V2}.buffer_utils", "UvaBackedTensor.np", "writes it: the host side of the set starts"),
    _attribute(f"{_V2}.buffer_utils", "UvaBackedTensor.gpu", "reads it: the device side of the set starts"),
    _attribute(_BATCH, "InputBatch.num_tokens", "reads it: the step's real tokens"),
    _attribute(_BATCH, "InputBatch.num_reqs", "reads it: the step's requests"),
    _attribute(_BATCH, "InputBatch.query_start_loc", "reads it: each token's request"),
    _attribute(_BATCH, "InputBatch.idx_mapping", "reads it: each request's slot"),
    _attribute(_BATCH, "InputBatch.positions", "reads it: the positions V2 computed"),
    _attribute("vllm.v1.core.sched.output", "NewRequestData.req_id", "reads it: names a request without a set"),
    _attribute("vllm.v1.core.sched.output", "NewRequestData.sampling_params", "reads it: the request's set index"),
)

# Checked by rope_ext.vllm_cli before it runs vLLM's CLI (not at every engine start: importing the
# CLI costs every process seconds).
CLI_INTERNALS = (
    Internal("vllm.entrypoints.cli.main", "main",
             "runs it after answering its importlib.metadata.version('vllm') lookup (rope_ext.vllm_cli)"),
)

PLUGIN_LISTS = {"plugin": INTERNALS, "V1 model runner": V1_RUNNER_INTERNALS,
                "V2 model runner": V2_RUNNER_INTERNALS, "CLI": CLI_INTERNALS}
