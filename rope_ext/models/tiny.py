"""A tiny random-weight Llama (W0 = 256) with a three-step ladder: regimes you can run in seconds.

Tests and the load benchmark build it: its sets differ clearly, every regime boundary is a
few hundred tokens away, and a CPU prefills it ~100× faster than the real model. It borrows
the real model's tokenizer, so prompts and chat templates behave as in production.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rope_ext.baselines import pi_set
from rope_ext.factors import FORMAT_VERSION, FactorSet, Ladder, ModelInfo, save_ladder

TINY_W0 = 256
TINY_MAX_LEN = 1024


def tiny_ladder() -> Ladder:
    """short (λ = 1) at W0, PI at 2·W0, a λ ramp 1 → 4 with n̂ = 4 at 4·W0: sets that clearly differ."""
    info = ModelInfo(name="tiny-llama", rope_theta=10000.0, rotary_dim=64, original_window=TINY_W0)
    ramp = [1.0 + 3.0 * i / 31 for i in range(32)]
    return Ladder(
        format_version=FORMAT_VERSION,
        model=info,
        sets=[
            FactorSet(name="short", window=TINY_W0, factors=[1.0] * 32),
            FactorSet(name="mid", window=2 * TINY_W0, factors=pi_set(info, 2 * TINY_W0).factors),
            FactorSet(name="long", window=TINY_MAX_LEN, factors=ramp, n_hat=4),
        ],
    )


def build_tiny_model(root: Path, tokenizer_dir: Path | None) -> tuple[Path, Path, Ladder]:
    """(model dir, factor file, ladder) under ``root``. The config carries the ladder's short and long
    sets as a Phi-3 style longrope config, so stock vLLM and plain `vllm serve` see a longrope model too.

    Without ``tokenizer_dir`` the model has no tokenizer: an engine then needs
    ``skip_tokenizer_init`` and token-id prompts (what ``longrope selftest`` sends).
    """
    ladder = tiny_ladder()
    model_dir = root / "tiny-llama"
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=TINY_MAX_LEN,
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "original_max_position_embeddings": TINY_W0,
            "short_factor": ladder.sets[0].factors,
            "long_factor": ladder.sets[-1].factors,
        },
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(model_dir)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
    factors = root / "tiny-ladder.json"
    save_ladder(ladder, factors)
    return model_dir, factors, ladder
