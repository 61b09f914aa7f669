"""Soak: the real model (SmolLM2-135M-Instruct) under `longrope serve` for a fixed time at a fixed concurrency.

The mix, per lane (8 lanes by default): short streamed chats (the usual traffic), streams the client
drops after a few chunks, and bad requests (a 4xx OpenAI error is their intended answer); every
LONG_EVERY_S lane 0 sends a chat past 8192 tokens instead (a passage of a book: the long set, and a
prefill that holds this CPU for about a minute). Every 10 s it samples the resident memory of the API
process and of the engine's processes, and the engine's running count. The report: errors beside the
intended 4xx (target 0), memory slope after warm-up in MB per hour (target flat), the engine's running
count at the end (target 0).

    .venv/bin/python -m bench.load.soak      # 10 minutes, concurrency 8: writes bench/load/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx
import psutil
from tqdm import tqdm

from bench.load.run import check_stream, running
from harness.servers import longrope_serve

HERE = Path(__file__).resolve().parent
MODEL = "smollm2"
SAMPLE_EVERY_S = 10.0
WARMUP_S = 120.0  # memory before this is the engine's warm-up (compiled graphs, first long prefill)
LONG_EVERY_S = 120.0  # "a few" long prompts: one a lane-0 request every two minutes, the first at 30 s
QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about rain.",
             "How many legs does a spider have?", "Give me a synonym for quick.", "What is 17 times 3?",
             "Tell me one fact about whales.", "Translate 'good morning' into Spanish."]
# Bad requests a client really sends; each must be a 4xx OpenAI error and leave the server serving.
BAD_BODIES = [
    {"model": MODEL, "messages": []},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 100},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "rope_set": 5},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "rope_set": "nope"},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"regex": "(["}},
    {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
]


def processes(server_pid: int) -> dict[str, psutil.Process]:
    """The API process and the engine's (vLLM titles them VLLM::EngineCore, VLLM::Worker)."""
    found = {"api": psutil.Process(server_pid)}
    for child in found["api"].children(recursive=True):
        if child.name().startswith("VLLM::"):
            found[child.name().removeprefix("VLLM::").lower()] = child
    return found


def rss_mb(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def slope_mb_per_hour(samples: list[dict], name: str) -> float | None:
    """Least-squares slope of one process's RSS over the samples after warm-up."""
    points = [(s["t"] / 3600, s["rss_mb"][name]) for s in samples if s["t"] >= WARMUP_S and name in s["rss_mb"]]
    if len(points) < 3:
        return None
    mean_t = sum(t for t, _ in points) / len(points)
    mean_m = sum(m for _, m in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (m - mean_m) for t, m in points) / spread


class Lane:
    """One client connection's worth of traffic: requests one after another until the deadline."""

    def __init__(self, index: int, base: str, passages: list[str], deadline: float, seed: int):
        self.index, self.base, self.passages, self.deadline = index, base, passages, deadline
        self.rng = random.Random(seed * 100 + index)
        self.next_long = time.monotonic() + 30.0 if index == 0 else None  # lane 0 alone sends long prompts
        self.longs_sent = 0

    def plan(self) -> tuple[str, dict]:
        if self.next_long is not None and time.monotonic() >= self.next_long:
            self.next_long += LONG_EVERY_S
            passage = self.passages[self.longs_sent % len(self.passages)]
            self.longs_sent += 1
            return "long", {"messages": [{"role": "user", "content": passage + "\n\nWho is speaking in this passage?"}],
                            "max_tokens": 16}
        roll = self.rng.random()
        if roll < 0.10:
            return "bad", dict(self.rng.choice(BAD_BODIES))
        question = {"messages": [{"role": "user", "content": self.rng.choice(QUESTIONS)}],
                    "max_tokens": self.rng.choice([16, 32, 64])}
        return ("dropped" if roll < 0.25 else "short"), question

    async def run(self, client: httpx.AsyncClient, results: list[dict], progress: tqdm) -> None:
        while time.monotonic() < self.deadline:
            kind, body = self.plan()
            started = time.monotonic()
            try:
                outcome = await self.send(client, kind, body)
            except Exception as exc:  # noqa: BLE001 - counted as an error in the report
                outcome = {"ok": False, "error": repr(exc)}
            results.append({"kind": kind, "seconds": round(time.monotonic() - started, 2), **outcome})
            progress.update(1)

    async def send(self, client: httpx.AsyncClient, kind: str, body: dict) -> dict:
        if kind == "bad":
            response = await client.post(f"{self.base}/v1/chat/completions", json=body)
            error = response.json().get("error") if response.headers.get("content-type", "").startswith(
                "application/json") else None
            shaped = isinstance(error, dict) and isinstance(error.get("code"), str)
            return {"ok": 400 <= response.status_code < 500 and shaped, "status": response.status_code,
                    **({} if shaped else {"error": response.text[:200]})}
        body = {"model": MODEL, "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}, **body}
        lines: list[str] = []
        async with client.stream("POST", f"{self.base}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
            async for line in response.aiter_lines():
                if line:
                    lines.append(line)
                if kind == "dropped" and len(lines) >= 3:
                    return {"ok": True}  # leaving the block closes the connection mid-stream
        checked = check_stream(lines)
        return {**checked, "rope_set": response.headers.get("x-rope-set")}


async def sample_until(deadline: float, started: float, pids: dict[str, psutil.Process], base: str,
                       samples: list[dict]) -> None:
    while time.monotonic() < deadline:
        samples.append({"t": round(time.monotonic() - started, 1),
                        "rss_mb": {name: round(rss_mb(p), 1) for name, p in pids.items() if p.is_running()},
                        "engine_running": await asyncio.to_thread(running, base)})
        await asyncio.sleep(SAMPLE_EVERY_S)


async def soak(base: str, pid: int, passages: list[str], seconds: float, concurrency: int,
               seed: int) -> tuple[list[dict], list[dict]]:
    started = time.monotonic()
    deadline = started + seconds
    results: list[dict] = []
    samples: list[dict] = []
    pids = processes(pid)
    lanes = [Lane(i, base, passages, deadline, seed) for i in range(concurrency)]
    with tqdm(desc="requests", unit="req") as progress:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as client:
            await asyncio.gather(sample_until(deadline, started, pids, base, samples),
                                 *(lane.run(client, results, progress) for lane in lanes))
    return results, samples


def long_passages(count: int, tokenizer_dir: Path) -> list[str]:
    """Book passages of 8300-8900 tokens each (past the 8192-token short set), from different places."""
    from transformers import AutoTokenizer

    from rope_ext.research.corpus import BOOKS_DIR, book_text

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(book_text(BOOKS_DIR / "pride-and-prejudice.txt"))["input_ids"]
    rng = random.Random(0)
    passages = []
    for i in range(count):
        start = i * 10_000
        passages.append(tokenizer.decode(ids[start:start + rng.randrange(8300, 8900)]))
    return passages


def summarise(results: list[dict], samples: list[dict], running_after: float, args: argparse.Namespace,
              flags: list[str], seconds: float) -> dict:
    by_kind: dict[str, dict] = {}
    for r in results:
        entry = by_kind.setdefault(r["kind"], {"requests": 0, "ok": 0})
        entry["requests"] += 1
        entry["ok"] += bool(r.get("ok"))
    errors = [r for r in results if not r.get("ok")]
    names = sorted({name for s in samples for name in s["rss_mb"]})
    after = [s for s in samples if s["t"] >= WARMUP_S]
    memory = {name: {"first_mb": samples[0]["rss_mb"].get(name), "after_warmup_mb": after[0]["rss_mb"].get(name)
                     if after else None, "last_mb": samples[-1]["rss_mb"].get(name),
                     "slope_mb_per_hour_after_warmup": round(slope, 2) if (slope := slope_mb_per_hour(samples, name))
                     is not None and math.isfinite(slope) else None} for name in names}
    return {
        "command": "python -m bench.load.soak" + (f" --minutes {args.minutes:g}" if args.minutes != 10 else "")
                   + (f" --concurrency {args.concurrency}" if args.concurrency != 8 else ""),
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "server": {"model": "SmolLM2-135M-Instruct (longrope prepare-model), the shipped ladder",
                   "flags": flags},
        "minutes": args.minutes, "concurrency": args.concurrency, "seconds": round(seconds, 1),
        "requests": len(results), "by_kind": by_kind,
        "intended_4xx": sum(1 for r in results if r["kind"] == "bad" and r.get("ok")),
        "errors": len(errors), "error_samples": errors[:5],
        "engine_running_after": running_after,
        "memory": memory, "warmup_s": WARMUP_S, "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "soak.json")
    args = parser.parse_args()

    from rope_ext.models.smollm2 import prepare_model

    model = prepare_model()
    passages = long_passages(6, model)
    flags = ["--served-model-name", MODEL, "--seed", "0"]  # otherwise `longrope serve`'s defaults (compiled, float32)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    server = longrope_serve(flags, tmp / "server.log", {"VLLM_CPU_KVCACHE_SPACE": "2"})
    with server:
        started = time.monotonic()
        results, samples = asyncio.run(soak(server.base, server.proc.pid, passages, args.minutes * 60,
                                            args.concurrency, args.seed))
        seconds = time.monotonic() - started
        deadline = time.time() + 60
        while running(server.base) > 0 and time.time() < deadline:
            time.sleep(0.5)
        running_after = running(server.base)
    report = summarise(results, samples, running_after, args, flags, seconds)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if report["errors"] or running_after:
        sys.exit(1)


if __name__ == "__main__":
    main()
