"""Our tables equal transformers' own rope functions wherever both define the same thing."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from rope_ext.baselines import METHODS, baseline_ladder, ntk_base, ntk_factors, plain_set, yarn_factors
from rope_ext.factors import FactorSet, ModelInfo
from rope_ext.frequencies import inv_freq, ladder_cos_sin_cache, rotary_tables

pytestmark = pytest.mark.unit

HEAD_DIM, THETA, W0 = 64, 100000.0, 8192  # SmolLM2's shape
MODEL = ModelInfo(name="smollm2-shape", rope_theta=THETA, rotary_dim=HEAD_DIM, original_window=W0)


def hf_config(rope: dict, max_pos: int = W0, **extra) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_theta": THETA, **rope},
        **extra,
    )


def hf_tables(config: LlamaConfig, num_positions: int):
    """cos, sin [num_positions, d/2] from transformers' Llama rotary embedding."""
    rotary = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, num_positions, HEAD_DIM)
    cos, sin = rotary(x, torch.arange(num_positions)[None])
    return cos[0, :, : HEAD_DIM // 2], sin[0, :, : HEAD_DIM // 2]


def assert_tables_equal(ours, theirs, atol=1e-5):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_plain_rope_matches_default():
    ours = rotary_tables(plain_set(MODEL), THETA, HEAD_DIM, 12000)
    assert_tables_equal(ours, hf_tables(hf_config({"rope_type": "default"}), 12000))


def test_linear_matches_pi():
    ref, _ = ROPE_INIT_FUNCTIONS["linear"](hf_config({"rope_type": "linear", "factor": 2.0}), "cpu")
    pi = METHODS["pi"](MODEL, 2 * W0)
    torch.testing.assert_close(inv_freq(pi.factors, THETA, HEAD_DIM), ref, rtol=1e-6, atol=0)
    assert pi.attention_scale == 1.0


@pytest.mark.parametrize("seq_len", [10000, 16384])
def test_dynamic_ntk_at_a_fixed_length_matches_ntk(seq_len):
    factor = 2.0
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config({"rope_type": "dynamic", "factor": factor}), "cpu", seq_len)
    effective_scale = factor * seq_len / W0 - (factor - 1)  # transformers' dynamic rule at this length
    ours = inv_freq(ntk_factors(MODEL, effective_scale), THETA, HEAD_DIM)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("scale", [2.0, 4.0])
def test_ntk_base_is_the_ntk_set(scale):
    """A stock engine given `ntk_base` as its θ rotates as our NTK set does."""
    ref = inv_freq([1.0] * (HEAD_DIM // 2), ntk_base(MODEL, scale), HEAD_DIM)
    torch.testing.assert_close(inv_freq(ntk_factors(MODEL, scale), THETA, HEAD_DIM), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("scale", [2.0, 4.0])
def test_yarn_matches(scale):
    config = hf_config(
        {"rope_type": "yarn", "factor": scale, "original_max_position_embeddings": W0}, max_pos=int(W0 * scale)
    )
    ref, ref_attention = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    yarn = METHODS["yarn"](MODEL, int(W0 * scale))
    torch.testing.assert_close(inv_freq(yarn.factors, THETA, HEAD_DIM), ref, rtol=1e-5, atol=0)
    assert yarn.attention_scale == pytest.approx(ref_attention)
    # YaRN's blend of two inv_freqs, rewritten as one λ, differs in the last float32 bit; at
    # position 20000 that bit moves cos/sin by up to ~4e-5.
    assert_tables_equal(rotary_tables(yarn, THETA, HEAD_DIM, 20000), hf_tables(config, 20000), atol=1e-4)


def longrope_config(short, long, max_pos=4 * W0):
    return hf_config(
        {"rope_type": "longrope", "short_factor": short, "long_factor": long, "original_max_position_embeddings": W0},
        max_pos=max_pos,
    )


@pytest.mark.parametrize("which", ["short", "long"])
def test_longrope_short_and_long_match(which):
    short = [1.0 + 0.01 * i for i in range(HEAD_DIM // 2)]
    long = yarn_factors(MODEL, 4.0)
    config = longrope_config(short, long)
    seq_len = W0 if which == "short" else 2 * W0
    ref, attention = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len)
    factors = short if which == "short" else long
    fs = FactorSet(name=which, window=4 * W0, factors=factors, attention_scale=attention)
    torch.testing.assert_close(inv_freq(fs.factors, THETA, HEAD_DIM), ref, rtol=1e-6, atol=0)
    assert attention == pytest.approx(math.sqrt(1 + math.log(4) / math.log(W0)))
    # transformers' rotary module picks short or long by the length it is called with
    assert_tables_equal(rotary_tables(fs, THETA, HEAD_DIM, seq_len), hf_tables(config, seq_len))


def test_n_hat_keeps_first_positions_plain_by_hand():
    """d = 4, θ = 100, λ = (2, 4), n̂ = 2: positions 0 and 1 use θ_i, from 2 on θ_i / λ_i."""
    fs = FactorSet(name="x", window=8, factors=[2.0, 4.0], n_hat=2, attention_scale=1.5)
    cos, sin = rotary_tables(fs, 100.0, 4, 4)
    # θ_0 = 1, θ_1 = 100^(-1/2) = 0.1
    expected_angles = [[0.0, 0.0], [1.0, 0.1], [2 / 2, 2 * 0.1 / 4], [3 / 2, 3 * 0.1 / 4]]
    for p, (a0, a1) in enumerate(expected_angles):
        assert cos[p].tolist() == pytest.approx([1.5 * math.cos(a0), 1.5 * math.cos(a1)], abs=1e-6)
        assert sin[p].tolist() == pytest.approx([1.5 * math.sin(a0), 1.5 * math.sin(a1)], abs=1e-6)


def test_ladder_cache_stacks_sets_in_order():
    ladder = baseline_ladder(MODEL, "yarn", 2 * W0)
    cache = ladder_cos_sin_cache(ladder, 100)
    assert cache.shape == (200, HEAD_DIM)
    long_cos, long_sin = rotary_tables(ladder.sets[1], THETA, HEAD_DIM, 100)
    torch.testing.assert_close(cache[100:], torch.cat((long_cos, long_sin), dim=-1))
    assert not torch.allclose(cache[:100], cache[100:])


def test_tables_are_built_on_the_device_asked_for():
    """The search builds a set's tables per evaluation where the model runs: on a GPU no cos/sin is
    computed on the host nor copied. "meta" stands in for that device here: every step of the
    computation (n̂'s rows too) must follow it. On the CPU, asking for it changes nothing."""
    fs = FactorSet(name="x", window=2 * W0, factors=yarn_factors(MODEL, 2.0), n_hat=16, attention_scale=1.1)
    cos, sin = rotary_tables(fs, THETA, HEAD_DIM, 1000, device="meta")
    assert cos.device.type == sin.device.type == "meta" and cos.shape == sin.shape == (1000, HEAD_DIM // 2)
    on_cpu = rotary_tables(fs, THETA, HEAD_DIM, 1000, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(on_cpu, rotary_tables(fs, THETA, HEAD_DIM, 1000)))
