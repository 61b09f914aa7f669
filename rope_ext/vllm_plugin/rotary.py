"""The rotary embedding that holds every factor set of a ladder in one table, and the swap that puts it
in a loaded model in place of vLLM's own.

It is vLLM's own ``RotaryEmbedding`` (same CPU, CUDA and native kernels, same compile
behaviour) with a different cos/sin cache: set k's rows start at k · rows_per_set. The
runner shifts each token's position by its set's start (runners.py), so a plain index lookup
rotates it with its own set, and nothing per step lives inside the (compiled) model. Both of
vLLM's model runners use this module as it is.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase
from vllm.model_executor.layers.rotary_embedding.deepseek_scaling_rope import DeepseekScalingRotaryEmbedding
from vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope import Phi3LongRoPEScaledRotaryEmbedding

from rope_ext.factors import Ladder
from rope_ext.frequencies import ladder_cos_sin_cache
from rope_ext.vllm_plugin.model_ladder import LadderMismatch


class LadderRotaryEmbedding(RotaryEmbedding):
    def __init__(
        self,
        ladder: Ladder,
        rows_per_set: int,
        head_size: int,
        is_neox_style: bool,
        dtype: torch.dtype,
    ) -> None:
        self.ladder = ladder
        self.rows_per_set = rows_per_set
        super().__init__(
            head_size=head_size,
            rotary_dim=ladder.model.rotary_dim,
            max_position_embeddings=rows_per_set * len(ladder.sets),
            base=ladder.model.rope_theta,
            is_neox_style=is_neox_style,
            dtype=dtype,
        )

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        return ladder_cos_sin_cache(self.ladder, self.rows_per_set)

    def extra_repr(self) -> str:
        return f"sets={self.ladder.names}, rows_per_set={self.rows_per_set}, " + super().extra_repr()


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
