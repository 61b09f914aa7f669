"""The model side, shared by both runners: rotary modules swapped for the ladder's, refused where one table
cannot stand for them (rope_ext/vllm_plugin/rotary.py)."""

import pytest
import torch

from rope_ext.vllm_plugin.model_ladder import LadderMismatch


def _rotary_layer(base: float):
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    layer = torch.nn.Module()
    layer.rotary_emb = RotaryEmbedding(64, 64, 1024, base, True, torch.float32)
    return layer


@pytest.fixture
def vllm_context():
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        yield


@pytest.mark.unit
def test_rotary_modules_that_differ_are_refused(tiny_model, vllm_context):
    """Local and global RoPE bases in one model: one ladder cannot replace both."""
    from rope_ext.vllm_plugin.rotary import swap_rotary

    ladder = tiny_model[2]
    alike = torch.nn.Sequential(_rotary_layer(10000.0), _rotary_layer(10000.0))
    assert swap_rotary(alike, ladder, 1024, torch.float32) == 2
    differ = torch.nn.Sequential(_rotary_layer(10000.0), _rotary_layer(1e6))
    with pytest.raises(LadderMismatch, match=r"rotary modules differ \(0\.rotary_emb: .*base=10000\.0.*; "
                                             r"1\.rotary_emb: .*base=1000000\.0"):
        swap_rotary(differ, ladder, 1024, torch.float32)


@pytest.mark.unit
def test_only_the_language_models_rotary_modules_are_swapped(tiny_model, vllm_context):
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    from rope_ext.vllm_plugin.rotary import LadderRotaryEmbedding, swap_rotary

    class Multimodal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = _rotary_layer(1e6)  # another base: would be refused if it were swapped
            self.language = torch.nn.Sequential(_rotary_layer(10000.0), _rotary_layer(10000.0))

        def get_language_model(self):
            return self.language

    model = Multimodal()
    assert swap_rotary(model, tiny_model[2], 1024, torch.float32) == 2
    assert all(isinstance(layer.rotary_emb, LadderRotaryEmbedding) for layer in model.language)
    assert type(model.vision.rotary_emb) is RotaryEmbedding


@pytest.mark.unit
def test_mla_style_rotary_is_refused(tiny_model, vllm_context):
    from vllm.model_executor.layers.rotary_embedding.deepseek_scaling_rope import DeepseekScalingRotaryEmbedding

    from rope_ext.vllm_plugin.rotary import swap_rotary

    layer = torch.nn.Module()
    layer.rotary_emb = DeepseekScalingRotaryEmbedding(64, 64, 1024, 10000.0, True, 4.0, torch.float32)
    with pytest.raises(LadderMismatch, match=r"rotary_emb is a DeepseekScalingRotaryEmbedding \(MLA"):
        swap_rotary(torch.nn.Sequential(layer), tiny_model[2], 1024, torch.float32)


@pytest.mark.unit
@pytest.mark.parametrize("keep", ["buffer", "attribute", "list", "dict"])
def test_a_module_that_kept_the_stock_table_is_refused(tiny_model, vllm_context, keep):
    """Model code that took the cos/sin table (or a view of it) at init would rotate with it after the swap;
    a copy is its own storage and a clean model passes."""
    from rope_ext.vllm_plugin.rotary import swap_rotary

    ladder = tiny_model[2]
    model = torch.nn.Sequential(_rotary_layer(10000.0), _rotary_layer(10000.0))
    fused = torch.nn.Module()
    table = model[1].rotary_emb.cos_sin_cache[:512]  # a view: same storage
    if keep == "buffer":
        fused.register_buffer("cos_sin", table, persistent=False)
    elif keep == "attribute":
        object.__setattr__(fused, "cos_sin", table)
    elif keep == "list":
        fused.tables = [torch.zeros(1), table]
    else:
        fused.tables = {"cos_sin": table}
    model[1].fused_rope = fused
    with pytest.raises(LadderMismatch, match=r"1\.fused_rope\.(cos_sin|tables\[.+\]) \(Module\) still holds the "
                                             r"stock rotary cos/sin table"):
        swap_rotary(model, ladder, 1024, torch.float32)

    copied = torch.nn.Sequential(_rotary_layer(10000.0))
    copied[0].fused_rope = torch.nn.Module()
    copied[0].fused_rope.register_buffer("cos_sin", copied[0].rotary_emb.cos_sin_cache.clone(), persistent=False)
    assert swap_rotary(copied, ladder, 1024, torch.float32) == 1
