"""The plugin's per-step work, timed alone in one process: where prefill time could go.

The engine benchmark (run.py) compares whole engines, whose spread on a shared host exceeds the
1 % target. This times the three things the plugin adds to a step, at the engine benchmark's
prefill shape (8 prompts × 1024 tokens, SmolLM2's heads, float32, one thread):
- vLLM's CPU rotary kernel with the stacked two-set table against the plain table (ratio);
- filling the per-token offsets (one numpy repeat) and adding/subtracting them on positions,
  against one rotary call (30 of which run per step).

    .venv/bin/python -m bench.plugin_overhead.mechanism   # writes bench/plugin_overhead/mechanism.json
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
TOKENS, REQUESTS, LAYERS = 8192, 8, 30
Q_HEADS, KV_HEADS, HEAD = 9, 3, 64


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    torch.set_num_threads(1)
    with set_current_vllm_config(VllmConfig()):
        plain = RotaryEmbedding(HEAD, HEAD, TOKENS, 100000.0, True, torch.float32)
        stacked = RotaryEmbedding(HEAD, HEAD, 2 * TOKENS, 100000.0, True, torch.float32)
    positions = torch.arange(TOKENS) % (TOKENS // REQUESTS)
    query, key = torch.randn(TOKENS, Q_HEADS * HEAD), torch.randn(TOKENS, KV_HEADS * HEAD)
    offsets = torch.zeros(TOKENS, dtype=torch.int64)
    offsets_np, counts, starts = offsets.numpy(), np.full(REQUESTS, TOKENS // REQUESTS), np.zeros(REQUESTS, np.int64)

    def fill() -> None:
        offsets_np[:TOKENS] = np.repeat(starts * TOKENS, counts)

    def shift() -> None:
        positions.add_(offsets)
        positions.sub_(offsets)

    # interleaved rounds, best of each: a drift of the host favours neither table
    rounds = [(per_call_us(lambda: plain.forward_cpu(positions, query, key), 20),
               per_call_us(lambda: stacked.forward_cpu(positions, query, key), 20)) for _ in range(8)]
    rotary_plain, rotary_stacked = min(r[0] for r in rounds), min(r[1] for r in rounds)
    fill_us, shift_us = per_call_us(fill, 500), per_call_us(shift, 500)
    result = {
        "command": "python -m bench.plugin_overhead.mechanism",
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
        "shape": {"tokens": TOKENS, "requests": REQUESTS, "q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head": HEAD},
        "rotary_us": {"plain_table": rotary_plain, "stacked_table": rotary_stacked},
        "ratio_stacked_over_plain": rotary_stacked / rotary_plain,
        "per_step_us": {"fill_offsets": fill_us, "add_and_subtract": shift_us},
        "per_step_extra_over_rotary_work": (fill_us + shift_us) / (LAYERS * rotary_plain),
    }
    (HERE / "mechanism.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
