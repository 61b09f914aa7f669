"""Worker side of the plugin: a model-runner mixin that shifts positions into each token's set.

Once per step, after vLLM has built the step's positions (and used them for the KV slot
mapping), each request's set index becomes a per-token offset array with one numpy repeat
(no loop over tokens). Around the model call the offsets are added to the positions tensor
in place, so the compiled graph and CUDA graphs see the same input buffer they were
captured with, and are taken off again right after.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from vllm.config import set_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase
from vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope import Phi3LongRoPEScaledRotaryEmbedding

from rope_ext.factors import Ladder
from rope_ext.vllm_plugin.model_ladder import LadderMismatch, ladder_for_model
from rope_ext.vllm_plugin.request_sets import ROPE_SET_KEY, set_for_request
from rope_ext.vllm_plugin.rotary import LadderRotaryEmbedding
from rope_ext.vllm_plugin.vllm_internals import RUNNER_STATE, check_runner_state

logger = init_logger(__name__)

STOCK_ROTARY = (RotaryEmbeddingBase, Phi3LongRoPEScaledRotaryEmbedding)


def swap_rotary(model: torch.nn.Module, ladder: Ladder, rows_per_set: int, dtype: torch.dtype) -> int:
    """Replace every stock rotary embedding in ``model`` with the ladder's; return how many modules use it."""
    made: dict[int, LadderRotaryEmbedding] = {}
    uses = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if not isinstance(child, STOCK_ROTARY) or isinstance(child, LadderRotaryEmbedding):
                continue
            if id(child) not in made:
                if child.rotary_dim != ladder.model.rotary_dim:
                    raise LadderMismatch(
                        f"factor file: model.rotary_dim is {ladder.model.rotary_dim}, "
                        f"but the model's rotary embedding rotates {child.rotary_dim} dims"
                    )
                device = next(child.buffers()).device
                made[id(child)] = LadderRotaryEmbedding(
                    ladder, rows_per_set, child.head_size, getattr(child, "is_neox_style", True), dtype
                ).to(device)
            setattr(parent, name, made[id(child)])
            uses += 1
    if not uses:
        raise LadderMismatch(f"{type(model).__name__} has no rotary embedding that the plugin knows how to replace")
    return uses


class PerRequestSetsMixin:
    """Mixed into vLLM's (CPU or GPU) model runner by ``register``."""

    _rope_ladder: Ladder | None = None

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]
        ladder = ladder_for_model(self.model_config.hf_config)  # type: ignore[attr-defined]
        if ladder is None:
            return
        check_runner_state(self, RUNNER_STATE)
        rows = self.model_config.max_model_len  # type: ignore[attr-defined]
        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            uses = swap_rotary(self.get_model(), ladder, rows, self.model_config.dtype)  # type: ignore[attr-defined]
        self._rope_ladder = ladder
        self._rope_rows = rows
        size = self.max_num_tokens  # type: ignore[attr-defined]
        device = self.device  # type: ignore[attr-defined]
        # pinned on CUDA: the per-step copy to the device is asynchronous, pageable memory would stall it
        self._rope_offsets_cpu = torch.zeros(size, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._rope_offsets_np = self._rope_offsets_cpu.numpy()
        self._rope_offsets = self._rope_offsets_cpu if device.type == "cpu" else self._rope_offsets_cpu.to(device)
        self._rope_filled = 0
        self._rope_set_of: dict[str, int] = {}
        logger.info(
            "longrope: %d rotary modules use the ladder %s (%d rows per set)", uses, ", ".join(ladder.names), rows
        )

    def _rope_set_index(self, req_id: str) -> int:
        index = self._rope_set_of.get(req_id)
        if index is None:
            state = self.requests[req_id]  # type: ignore[attr-defined]
            params = state.sampling_params
            assert self._rope_ladder is not None
            if params is not None and params.extra_args and ROPE_SET_KEY in params.extra_args:
                index = self._rope_ladder.index_of(params.extra_args[ROPE_SET_KEY])
            else:  # the API process had no plugin: apply the same rule here
                max_tokens = params.max_tokens if params is not None else 1
                index = set_for_request(self._rope_ladder, len(state.prompt_token_ids or ()), max_tokens, None)
            self._rope_set_of[req_id] = index
        return index

    def _update_states(self, scheduler_output: Any) -> Any:
        if self._rope_ladder is not None:
            for req_id in scheduler_output.finished_req_ids:
                self._rope_set_of.pop(req_id, None)
        return super()._update_states(scheduler_output)  # type: ignore[misc]

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)  # type: ignore[misc]
        if self._rope_ladder is not None:
            self._fill_rope_offsets(num_scheduled_tokens)
        return result

    def _fill_rope_offsets(self, num_scheduled_tokens: np.ndarray) -> None:
        num_reqs = len(num_scheduled_tokens)
        req_ids = self.input_batch.req_ids[:num_reqs]  # type: ignore[attr-defined]
        starts = np.fromiter((self._rope_set_index(r) for r in req_ids), dtype=np.int64, count=num_reqs)
        total = int(num_scheduled_tokens.sum())
        self._rope_offsets_np[:total] = np.repeat(starts * self._rope_rows, num_scheduled_tokens)
        touched = max(total, self._rope_filled)
        self._rope_offsets_np[total:touched] = 0  # padding tokens read set 0
        self._rope_filled = total
        if self._rope_offsets is not self._rope_offsets_cpu:
            self._rope_offsets[:touched].copy_(self._rope_offsets_cpu[:touched], non_blocking=True)

    def _model_forward(self, input_ids: Any = None, positions: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if self._rope_ladder is None or positions is None:
            return super()._model_forward(input_ids=input_ids, positions=positions, **kwargs)  # type: ignore[misc]
        offsets = self._rope_offsets[: positions.shape[0]]
        positions.add_(offsets)
        try:
            return super()._model_forward(input_ids=input_ids, positions=positions, **kwargs)  # type: ignore[misc]
        finally:
            positions.sub_(offsets)
