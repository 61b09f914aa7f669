"""Fixtures for the engine tests: a tiny random-weight Llama with a three-step ladder, and an engine runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rope_ext.baselines import pi_set
from rope_ext.factors import FORMAT_VERSION, FactorSet, Ladder, ModelInfo, save_ladder

REPO = Path(__file__).resolve().parents[2]
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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_dir) -> tuple[Path, Path, Ladder]:
    """(model dir, factor file, ladder). The config carries the ladder's short and long sets as a
    Phi-3 style longrope config, so stock vLLM and plain `vllm serve` see a longrope model too."""
    ladder = tiny_ladder()
    root = tmp_path_factory.mktemp("tiny")
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
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(model_dir)
    factors = root / "tiny-ladder.json"
    save_ladder(ladder, factors)
    return model_dir, factors, ladder


def run_engine(spec: dict, env: dict[str, str], tmp_path: Path, name: str) -> dict:
    """Run tests/vllm_plugin/engine_run.py in a fresh process with ``env`` added."""
    spec_path, out_path = tmp_path / f"{name}-spec.json", tmp_path / f"{name}-out.json"
    spec_path.write_text(json.dumps(spec))
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **env}
    result = subprocess.run(
        [sys.executable, "-m", "tests.vllm_plugin.engine_run", str(spec_path), str(out_path)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise AssertionError(f"engine run {name} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return json.loads(out_path.read_text())


@pytest.fixture(scope="session")
def tiny_reference(tiny_model):
    from tests.vllm_plugin.reference import ReferenceModel

    model_dir, _, ladder = tiny_model
    return ReferenceModel(model_dir, ladder, TINY_MAX_LEN)


@pytest.fixture(scope="session")
def plugin_engine(tiny_model, tmp_path_factory) -> dict:
    """Every wave of tests/vllm_plugin/workload.py through one compiled float32 engine with the plugin.

    Returns {"results": per request, "metrics": engine counters, "groups": name -> request indices,
    "requests": the requests}.
    """
    from tests.vllm_plugin.workload import ENGINE, engine_spec

    model_dir, factors, _ = tiny_model
    spec, groups = engine_spec(str(model_dir), ENGINE)
    out = run_engine(spec, {"LONGROPE_FACTORS": str(factors)}, tmp_path_factory.mktemp("plugin"), "plugin")
    return {**out, "groups": groups, "requests": spec["requests"]}
