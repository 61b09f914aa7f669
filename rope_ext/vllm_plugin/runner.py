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
from vllm.model_executor.layers.rotary_embedding.deepseek_scaling_rope import DeepseekScalingRotaryEmbedding
from vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope import Phi3LongRoPEScaledRotaryEmbedding
from vllm.utils.platform_utils import is_pin_memory_available

from rope_ext.factors import Ladder
from rope_ext.protocol import SET_INDEX_KEY
from rope_ext.vllm_plugin.model_ladder import LadderMismatch, ladder_for_engine
from rope_ext.vllm_plugin.rotary import LadderRotaryEmbedding
from rope_ext.vllm_plugin.vllm_internals import RUNNER_STATE, check_runner_state

logger = init_logger(__name__)

STOCK_ROTARY = (RotaryEmbeddingBase, Phi3LongRoPEScaledRotaryEmbedding)
# Rotary classes with a rule of their own that one ladder table does not reproduce (MLA's YaRN mscale).
REFUSED_ROTARY = (DeepseekScalingRotaryEmbedding,)


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The text decoder of ``model``: vLLM's multimodal models expose it; a text model is its own."""
    getter = getattr(model, "get_language_model", None)
    return getter() if callable(getter) else model


def _rotary_signature(module: torch.nn.Module) -> tuple:
    """What makes two rotary modules rotate alike (vLLM shares one instance per configuration)."""
    return (type(module).__name__, module.head_size, module.rotary_dim, getattr(module, "base", None),
            getattr(module, "is_neox_style", True))


def _check_alike(distinct: list[tuple[str, torch.nn.Module]]) -> None:
    """One ladder replaces every rotary module, so they must all rotate alike (no local/global bases)."""
    (first_name, first), *others = distinct
    for name, module in others:
        if _rotary_signature(module) != _rotary_signature(first) or any(
            not torch.equal(a, b) for a, b in zip(first.buffers(), module.buffers())
        ):
            raise LadderMismatch(
                f"the model's rotary modules differ ({first_name}: {first.extra_repr()}; {name}: "
                f"{module.extra_repr()}), e.g. local and global RoPE bases; one ladder cannot stand for both. "
                "Serve this model without a ladder (unset LONGROPE_FACTORS) or with LONGROPE_PLUGIN=0"
            )


def swap_rotary(model: torch.nn.Module, ladder: Ladder, rows_per_set: int, dtype: torch.dtype) -> int:
    """Replace the language model's rotary embeddings with the ladder's; return how many modules use it.

    Refuses rotary modules that differ from one another, or that rotate another number of dims.
    """
    text_model = language_model(model)
    distinct: dict[int, tuple[str, torch.nn.Module]] = {}  # by identity: vLLM shares one module per config
    places: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    for parent_name, parent in text_model.named_modules():
        for name, child in parent._modules.items():
            if isinstance(child, STOCK_ROTARY) and not isinstance(child, LadderRotaryEmbedding):
                distinct.setdefault(id(child), (f"{parent_name}.{name}".lstrip("."), child))
                places.append((parent, name, child))
    if not places:
        raise LadderMismatch(f"{type(model).__name__} has no rotary embedding that the plugin knows how to replace")
    for name, module in distinct.values():
        if isinstance(module, REFUSED_ROTARY):
            raise LadderMismatch(
                f"{name} is a {type(module).__name__} (MLA / DeepSeek-style rotary with its own mscale), which the "
                "plugin has not been proven on. Serve this model without a ladder (unset LONGROPE_FACTORS) or with "
                "LONGROPE_PLUGIN=0"
            )
    _check_alike(list(distinct.values()))
    stock = places[0][2]
    if stock.rotary_dim != ladder.model.rotary_dim:
        raise LadderMismatch(
            f"factor file: model.rotary_dim is {ladder.model.rotary_dim}, "
            f"but the model's rotary embedding rotates {stock.rotary_dim} dims"
        )
    device = next(stock.buffers()).device
    ladder_rotary = LadderRotaryEmbedding(
        ladder, rows_per_set, stock.head_size, getattr(stock, "is_neox_style", True), dtype
    ).to(device)
    for parent, name, _ in places:
        setattr(parent, name, ladder_rotary)
    _check_no_stock_table_left(text_model, [module for _, module in distinct.values()])
    return len(places)


def _tensors_held(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every tensor ``module`` holds itself: parameters, buffers and plain attributes (also inside lists,
    tuples and dicts, where model code keeps caches it copied at init)."""
    found: list[tuple[str, torch.Tensor]] = []
    for attr, value in vars(module).items():
        if attr in ("_parameters", "_buffers"):
            found += [(name, t) for name, t in value.items() if isinstance(t, torch.Tensor)]
        elif isinstance(value, torch.Tensor):
            found.append((attr, value))
        elif isinstance(value, (list, tuple, dict)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            found += [(f"{attr}[{key!r}]", t) for key, t in items if isinstance(t, torch.Tensor)]
    return found


def _check_no_stock_table_left(text_model: torch.nn.Module, stock: list[torch.nn.Module]) -> None:
    """Refuse a model whose modules still read a stock cos/sin table (any buffer of a replaced module) after the swap.

    Some model code takes the table from its rotary module at init (fused rope paths); those modules
    would keep rotating every request with the stock table. Checked by storage, not by model name.
    """
    tables = {table.untyped_storage().data_ptr() for module in stock for table in module.buffers()}
    tables.discard(0)  # a tensor without storage (meta device) cannot share it
    for module_name, module in text_model.named_modules():
        if isinstance(module, LadderRotaryEmbedding):
            continue
        for name, tensor in _tensors_held(module):
            if tensor.untyped_storage().data_ptr() in tables:
                where = f"{module_name}.{name}".lstrip(".")
                raise LadderMismatch(
                    f"{where} ({type(module).__name__}) still holds the stock rotary cos/sin table after the plugin "
                    "swapped the rotary modules: that code path would rotate every request with the stock table. "
                    "Serve this model without a ladder (unset LONGROPE_FACTORS) or with LONGROPE_PLUGIN=0"
                )


class PerRequestSetsMixin:
    """Mixed into vLLM's (CPU or GPU) model runner by ``register``."""

    _rope_ladder: Ladder | None = None

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]
        ladder = ladder_for_engine(self.vllm_config)  # type: ignore[attr-defined]
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
        # pinned where vLLM says the platform allows it: the per-step copy to the device is then asynchronous
        pinned = device.type != "cpu" and is_pin_memory_available()
        self._rope_offsets_cpu = torch.zeros(size, dtype=torch.int64, pin_memory=pinned)
        self._rope_offsets_np = self._rope_offsets_cpu.numpy()
        self._rope_offsets = self._rope_offsets_cpu if device.type == "cpu" else self._rope_offsets_cpu.to(device)
        self._rope_filled = 0
        self._rope_set_of: dict[str, int] = {}
        logger.info(
            "longrope: %d rotary modules use the ladder %s (%d rows per set)", uses, ", ".join(ladder.names), rows
        )

    def _rope_set_index(self, req_id: str) -> int:
        """The set index the input processor gave the request (request_sets.py), read once per request."""
        index = self._rope_set_of.get(req_id)
        if index is None:
            params = self.requests[req_id].sampling_params  # type: ignore[attr-defined]
            index = (params.extra_args or {}).get(SET_INDEX_KEY) if params is not None else None
            if index is None:
                raise LadderMismatch(
                    f"request {req_id} reached the model runner without a factor set: the process that took it "
                    "in runs without the longrope plugin (LONGROPE_PLUGIN or VLLM_PLUGINS differ between processes)"
                )
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
        if self._rope_ladder is None or positions is None:
            return super()._model_forward(input_ids=input_ids, positions=positions, **kwargs)  # type: ignore[misc]
        offsets = self._rope_offsets[: positions.shape[0]]
        positions.add_(offsets)
        try:
            return super()._model_forward(input_ids=input_ids, positions=positions, **kwargs)  # type: ignore[misc]
        finally:
            positions.sub_(offsets)
