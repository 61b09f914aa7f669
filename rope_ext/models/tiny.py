"""Tiny random-weight models (W0 = 256) whose regime boundaries are a few hundred tokens away.

- A Llama with a three-step ladder: tests, the selftest and the load benchmark build it; its sets
  differ clearly and a CPU prefills it ~100× faster than the real model.
- Phi-3 models carrying the real factor lists of Phi-3.5-mini-instruct (full rotary) and
  Phi-4-mini-instruct (partial rotary 0.75) in their own longrope config, the way those models
  ship: the proof that the plugin serves them per request, against transformers' own Phi-3.

They borrow the real model's tokenizer, so prompts and chat templates behave as in production.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from rope_ext.baselines import pi_set
from rope_ext.factors import FORMAT_VERSION, FactorSet, Ladder, ModelInfo, save_ladder

TINY_W0 = 256
TINY_MAX_LEN = 1024
# The vocabulary of a tiny model without a tokenizer (it takes token-id prompts, all below this). Small, because
# sampling and logprobs cost every step in proportion to it: most of all under vLLM's V2 model runner on CPU,
# whose Triton kernels the tests run in Triton's interpreter. With a tokenizer, the model takes its vocabulary.
TINY_VOCAB = 4096


def _vocab_size(tokenizer_dir: Path | None) -> int:
    return len(AutoTokenizer.from_pretrained(tokenizer_dir)) if tokenizer_dir is not None else TINY_VOCAB


def _save_tokenizer(tokenizer_dir: Path | None, model_dir: Path) -> None:
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)


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

    Without ``tokenizer_dir`` the model has no tokenizer and a vocabulary of TINY_VOCAB: an engine then needs
    ``skip_tokenizer_init`` and token-id prompts below TINY_VOCAB (what ``longrope selftest`` and the engine
    tests send).
    """
    ladder = tiny_ladder()
    model_dir = root / "tiny-llama"
    config = LlamaConfig(
        vocab_size=_vocab_size(tokenizer_dir),
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
    _save_tokenizer(tokenizer_dir, model_dir)
    factors = root / "tiny-ladder.json"
    save_ladder(ladder, factors)
    return model_dir, factors, ladder


# The RoPE fields of the real Phi models' configs (verbatim, with where they come from).
PHI_MODELS: dict[str, dict] = {k: v for k, v in json.loads(Path(__file__).with_name("phi_longrope.json").read_text())
                               .items() if not k.startswith("_")}


def build_tiny_phi3(root: Path, tokenizer_dir: Path | None, real: str, layout: str = "v5",
                    mscales: tuple[float, float] | None = None) -> Path:
    """A tiny random-weight ``Phi3ForCausalLM`` with ``real``'s head size, rotary fraction and factor lists,
    W0 = TINY_W0 and window TINY_MAX_LEN, its directory under ``root``.

    ``layout`` writes the RoPE fields as transformers v5 does (``rope_parameters``) or v4
    (``rope_scaling`` of type longrope, ``rope_theta``, ``original_max_position_embeddings`` and
    ``partial_rotary_factor`` at the top level); ``mscales`` adds ``short_mscale`` / ``long_mscale``.
    """
    phi = PHI_MODELS[real]
    params = {"rope_type": "longrope", "rope_theta": phi["rope_theta"], "short_factor": phi["short_factor"],
              "long_factor": phi["long_factor"], "original_max_position_embeddings": TINY_W0}
    if phi["partial_rotary_factor"] != 1.0:
        params["partial_rotary_factor"] = phi["partial_rotary_factor"]
    if mscales is not None:
        params["short_mscale"], params["long_mscale"] = mscales
    config = Phi3Config(vocab_size=_vocab_size(tokenizer_dir), hidden_size=2 * phi["head_dim"], intermediate_size=256,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        max_position_embeddings=TINY_MAX_LEN, original_max_position_embeddings=TINY_W0,
                        initializer_range=0.2, rope_parameters=params, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config).to(torch.float32)
    model_dir = root / f"tiny-{real}-{layout}{'-mscale' if mscales else ''}"
    model.save_pretrained(model_dir)
    if layout == "v4":
        _as_v4_layout(model_dir / "config.json")
    _save_tokenizer(tokenizer_dir, model_dir)
    return model_dir


def _as_v4_layout(path: Path) -> None:
    """Rewrite a saved config's RoPE fields the way transformers 4.x configs (and the Phi models' own) hold them."""
    config = json.loads(path.read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["original_max_position_embeddings"] = params.pop("original_max_position_embeddings")
    if "partial_rotary_factor" in params:
        config["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    params["type"] = params.pop("rope_type")
    config["rope_scaling"] = params
    path.write_text(json.dumps(config, indent=2) + "\n")
