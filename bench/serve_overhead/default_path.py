"""Serving overhead on the default path: streamed chats sent without max_tokens, as most clients send them.

Without max_tokens vLLM fills it with what the window leaves, so in `longrope serve` (its default
--max-model-len: the ladder's longest window) every such chat may outgrow its start set: it is promotable
and runs through the choice runner and segments (server/promotion.py), not passed through. Stock `vllm
serve` (plugin off, --max-model-len 8192) serves the same chats on the same weights; SmolLM2's plain RoPE
is the short set, so both generate the same tokens. Each chat asks for a text of a few hundred tokens,
sampled (temperature 0.7, top_p 0.9, chat i seeded i: greedy SmolLM2 runs on, looping, on most of
these subjects), and ends at EOS; a chat still going after CLIENT_BUDGET tokens is dropped by the client,
as a user would stop reading (the stream closes and the server aborts it). Servers in ABBA order (vllm,
ours, ours, vllm), each a fresh process; a 2-chat warm-up; then the loads at concurrency 1 and 8.
Throughput is completion tokens over the load's wall time; TTFT is the
time to the first chunk with text, as the client sees it.

    .venv/bin/python -m bench.serve_overhead.default_path   # writes bench/serve_overhead/results-default-path.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

from harness.servers import longrope_serve, vllm_serve

HERE = Path(__file__).resolve().parent
NAME = "smollm2"
COMMON = ["--dtype", "float32", "--enforce-eager", "--seed", "0", "--no-enable-prefix-caching"]
ORDER = ["vllm", "ours", "ours", "vllm"]
LOADS = [{"concurrency": 1, "chats": 6}, {"concurrency": 8, "chats": 24}]
CLIENT_BUDGET = 600  # tokens: a client stops reading a chat that runs on (closing the stream aborts it)
SUBJECTS = ["a lighthouse keeper", "the history of paper", "how bridges carry weight", "a fox and a crow",
            "why the sky is blue", "a journey across a desert", "how bread is made", "the life of a honeybee",
            "an old clockmaker", "how a river shapes a valley", "a city at night", "the first winter of a colony"]


def chats(count: int) -> list[dict]:
    return [{"model": NAME, "messages": [{"role": "user", "content": "Write a detailed text of about three hundred "
                                          f"words about {SUBJECTS[i % len(SUBJECTS)]}."}],
             "temperature": 0.7, "top_p": 0.9, "seed": i, "stream": True,
             "stream_options": {"include_usage": True, "continuous_usage_stats": True}} for i in range(count)]


async def one_chat(client: httpx.AsyncClient, body: dict) -> dict:
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if tokens >= CLIENT_BUDGET:
                break
    return {"ttft_s": first, "tokens": tokens, "dropped": tokens >= CLIENT_BUDGET}


async def load(base: str, concurrency: int, count: int) -> dict:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=f"{base}", timeout=1800) as client:
        async def bounded(body: dict) -> dict:
            async with limit:
                return await one_chat(client, body)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(body) for body in chats(count)))
        wall = time.perf_counter() - start
    return {"output_throughput": sum(r["tokens"] for r in results) / wall,
            "median_ttft_ms": 1000 * statistics.median(r["ttft_s"] for r in results),
            "mean_completion_tokens": statistics.mean(r["tokens"] for r in results),
            "dropped_at_budget": sum(r["dropped"] for r in results), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results-default-path.json")
    args = parser.parse_args()

    from rope_ext.models.smollm2 import prepare_model

    model = str(prepare_model())
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    tmp = Path(tempfile.mkdtemp(prefix="serve-default-"))
    servers = {
        "vllm": lambda log: vllm_serve(model, ["--served-model-name", NAME, "--max-model-len", "8192", *COMMON],
                                       log, env),
        "ours": lambda log: longrope_serve(["--model", model, "--served-model-name", NAME, *COMMON], log, env),
    }
    runs: dict[str, dict[str, list[dict]]] = {}
    for turn, label in enumerate(ORDER):
        print(f"{label} ({turn + 1}/{len(ORDER)}): starting ...", file=sys.stderr, flush=True)
        with servers[label](tmp / f"{label}-{turn}.log") as server:
            asyncio.run(load(server.base, 2, 2))  # warm-up
            for spec in LOADS:
                key = f"concurrency {spec['concurrency']}"
                runs.setdefault(key, {}).setdefault(label, []).append(
                    asyncio.run(load(server.base, spec["concurrency"], spec["chats"])))
                print(f"  {key}: {runs[key][label][-1]}", file=sys.stderr, flush=True)

    def mean(results: list[dict], key: str) -> float:
        return sum(r[key] for r in results) / len(results)

    keys = ("output_throughput", "median_ttft_ms")
    ratios = {key: {k: mean(v["ours"], k) / mean(v["vllm"], k) for k in keys} for key, v in runs.items()}
    result = {
        "command": "python -m bench.serve_overhead.default_path",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "engine_flags": {"common": COMMON, "vllm": ["--max-model-len", "8192"], "ours": "the ladder's longest window"},
        "load": {"client": "httpx, streamed chats without max_tokens, temperature 0.7, top_p 0.9, seed i",
                 "client_budget_tokens": CLIENT_BUDGET, "loads": LOADS},
        "order": ORDER,
        "runs": runs,
        "ratio_ours_over_vllm": ratios,
        "targets": {"output_throughput": ">= 0.98", "median_ttft_ms": "<= 1.03"},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
