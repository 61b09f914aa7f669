"""Promotion with no gap the user can see: streams that cross a window, side prefills off and on, in one run.

Two servers per model, one after the other: `--side-prefill-max-lead 0 --rope-start-rule window` (the
switch prefills everything, as before) and the defaults (side prefills in increments; a request with too
little room to hide the next set's prefill starts in that set). Each streamed completion asks for one
logprob per token, so the client knows which chunk carried which token. The measure is the user's: the
longest gap between consecutive chunks of a stream, before, at and after the switch, over the stream's
median gap (`longest_over_median`), with the switch's own gap beside it (`switch_over_median`).

- tiny: the tests' random-weight Llama (sets 256 / 512 / 1024), 16 streams at concurrency 8, each from
  a 200-token prompt for 400 tokens (crossing 256 and 512); throughput is their completion tokens over
  the wall time.
- smollm2: SmolLM2 with its shipped ladder, `--enforce-eager`: a stream from a passage of a book of 4000,
  6000 and 7000 tokens (`--prompts`) crossing 8192 by 100 tokens, alone and beside 4 short chats (streamed
  chat completions of 128 tokens, one after another, until the long stream ends); and one 60 tokens below
  8192 (8132), which starts in the 16k set when side prefills are on.

    .venv/bin/python -m bench.promotion.run     # writes bench/promotion/results.json (~2 h on 2 cores)
    .venv/bin/python -m bench.promotion.run --only smollm2 --prompts 6000 7000   # a part, merged into it
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

from harness.servers import longrope_serve
from rope_ext.models.tiny import TINY_MAX_LEN

HERE = Path(__file__).resolve().parent
SIDE = {"off": ["--side-prefill-max-lead", "0", "--rope-start-rule", "window"], "on": []}
BURST_S = 1e-4  # a median gap below this: the stream arrived in bursts (no ratio)
COUNTERS = ("longrope_promotion_cached_tokens_total", "longrope_side_prefills_total", "vllm:prefix_cache_hits_total")
PAST_WINDOW = 100  # tokens a SmolLM2 stream generates after crossing 8192
CHATS, CHAT_TOKENS = 4, 128
CHAT_TOPICS = ["the tides", "bread baking", "a lighthouse keeper", "river otters", "paper maps", "winter gardens",
               "old clocks", "mountain trains"]


def over_median(gap: float, median: float | None) -> float | None:
    """``gap`` over a stream's median gap; None for a stream that arrived in bursts (no gap to compare with)."""
    return round(gap / median, 2) if median is not None and median >= BURST_S else None


def gaps_between(chunks: list[tuple[float, int]]) -> list[float]:
    """Seconds between consecutive chunks' arrivals."""
    times = [t for t, _ in chunks]
    return [b - a for a, b in zip(times, times[1:])]


def chunk_gaps(gaps: list[float], chunks: list[tuple[float, int]]) -> dict:
    """A stream's longest gap between consecutive chunks (and after which of its tokens), its median gap and
    their ratio."""
    if not gaps:
        return {"chunks": len(chunks), "longest_gap_s": None, "median_gap_s": None, "longest_over_median": None}
    longest = max(range(len(gaps)), key=gaps.__getitem__)
    median = statistics.median(gaps)
    return {"chunks": len(chunks), "longest_gap_s": round(gaps[longest], 4),
            "longest_after_token": sum(n for _, n in chunks[:longest + 1]), "median_gap_s": round(median, 4),
            "longest_over_median": over_median(gaps[longest], median)}


async def stream(client: httpx.AsyncClient, base: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One greedy streamed completion: each chunk's arrival time and tokens, and the promotions it went through."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "stream": True}
    chunks: list[tuple[float, int]] = []
    promotions, start_set = [], None
    async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
        response.raise_for_status()
        start_set = response.headers.get("x-rope-set")  # sent before the first token: the start set
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            for choice in json.loads(line[6:])["choices"]:
                tokens = len((choice.get("logprobs") or {}).get("tokens") or [])
                if tokens:
                    chunks.append((now, tokens))
                if choice.get("finish_reason"):
                    promotions = choice.get("rope_promotions") or []
    return {"prompt_tokens": len(prompt), "chunks": chunks, "promotions": promotions, "start_set": start_set}


async def chat(client: httpx.AsyncClient, base: str, model: str, topic: str) -> dict:
    """One short streamed chat: its chunks' arrival times."""
    body = {"model": model, "messages": [{"role": "user", "content": f"Tell me about {topic}."}],
            "max_tokens": CHAT_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    chunks: list[tuple[float, int]] = []
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and any((c.get("delta") or {}).get("content")
                                                  for c in json.loads(line[6:])["choices"]):
                chunks.append((time.perf_counter(), 1))
    return chunk_gaps(gaps_between(chunks), chunks)


def stream_report(result: dict) -> dict:
    """A stream's gaps, and each switch's gap (before its first token) over the stream's median."""
    chunks = result["chunks"]
    between = gaps_between(chunks)
    median = statistics.median(between) if between else None
    arrivals = [t for t, n in chunks for _ in range(n)]
    switches = []
    for p in result["promotions"]:
        first_after = p["at_tokens"] - result["prompt_tokens"]  # index of the first token generated after it
        gap = arrivals[first_after] - arrivals[first_after - 1]
        switches.append({"from": p["from"], "to": p["to"], "at_tokens": p["at_tokens"], "switch_gap_s": round(gap, 4),
                         "switch_over_median": over_median(gap, median)})
    return {"prompt_tokens": result["prompt_tokens"], "start_set": result["start_set"], "tokens": len(arrivals),
            **chunk_gaps(between, chunks), "switches": switches}


def counters(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {name: sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))
            for name in COUNTERS}


async def run_streams(base: str, model: str, plans: list[tuple[list[int], int]], concurrency: int,
                      chats: int = 0) -> tuple[list[dict], list[dict]]:
    """``plans`` at ``concurrency``, and beside them ``chats`` short chats each, one after another, until they end."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600)) as client:
        async def guarded(prompt: list[int], max_tokens: int) -> dict:
            async with gate:
                return await stream(client, base, model, prompt, max_tokens)

        async def chatting(lane: int, done: asyncio.Event) -> list[dict]:
            reports = []
            while not done.is_set():
                reports.append(await chat(client, base, model, CHAT_TOPICS[(lane + len(reports)) % len(CHAT_TOPICS)]))
            return reports

        done = asyncio.Event()
        lanes = [asyncio.create_task(chatting(lane, done)) for lane in range(chats)]
        try:
            streams = await asyncio.gather(*(guarded(p, m) for p, m in plans))
        finally:
            done.set()
        return streams, [report for lane in await asyncio.gather(*lanes) for report in lane]


def measured(base: str, model: str, plans: list[tuple[list[int], int]], concurrency: int, chats: int = 0) -> dict:
    """One workload on a warm server: every stream's gaps, the chats', the throughput and the counters."""
    before = counters(base)
    started = time.perf_counter()
    streams, chat_reports = asyncio.run(run_streams(base, model, plans, concurrency, chats))
    seconds = time.perf_counter() - started
    after = counters(base)
    reports = [stream_report(r) for r in streams]
    tokens = sum(r["tokens"] for r in reports)
    out = {"streams": reports, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 2),
           **{name: after[name] - before[name] for name in COUNTERS}}
    if chats:
        ratios = [c["longest_over_median"] for c in chat_reports if c["longest_over_median"] is not None]
        out["chats"] = {"count": len(chat_reports), "max_longest_over_median": max(ratios, default=None),
                        "median_longest_over_median": statistics.median(ratios) if ratios else None,
                        "bursty": len(chat_reports) - len(ratios)}
    return out


def summary(cases: dict[str, dict]) -> dict:
    """Worst and median of the streams' longest-gap and switch-gap ratios, per side setting."""
    out = {}
    for side in SIDE:
        streams = [st for case in cases.values() for st in case[side]["streams"] if st["switches"]]
        longest = [st["longest_over_median"] for st in streams if st["longest_over_median"] is not None]
        switch = [s["switch_over_median"] for st in streams for s in st["switches"]
                  if s["switch_over_median"] is not None]
        out[side] = {"max_longest_over_median": max(longest, default=None),
                     "median_longest_over_median": statistics.median(longest) if longest else None,
                     "max_switch_over_median": max(switch, default=None),
                     "promoted_streams": len(streams), "bursty_streams": len(streams) - len(longest)}
    throughput = {side: sum(case[side]["tokens_per_s"] for case in cases.values()) for side in SIDE}
    out["throughput_on_over_off"] = round(throughput["on"] / throughput["off"], 3)
    return out


def phase(label: str, serve_args: list[str], env: dict[str, str], model: str,
          cases: dict[str, tuple[list[tuple[list[int], int]], int, int]], workdir: Path,
          warmup: list[tuple[list[int], int]]) -> dict:
    """Per side setting, one server: warm it up, then each case (plans, concurrency, chats beside them)."""
    out: dict[str, dict] = {name: {} for name in cases}
    for side, flags in SIDE.items():
        with longrope_serve([*serve_args, *flags], workdir / f"{label}-{side}.log", env, start_timeout=900) as server:
            asyncio.run(run_streams(server.base, model, warmup, 1))
            for name, (plans, concurrency, chats) in cases.items():
                print(f"[{time.strftime('%H:%M:%S')}] {label}: side prefills {side}: {name}", flush=True)
                out[name][side] = measured(server.base, model, plans, concurrency, chats)
    return {"date": date.today().isoformat(), "cases": out, "summary": summary(out)}


def book_passages(tokenizer, counts: list[int]) -> list[list[int]]:
    """Passages of a book, one after another (no two share a prefix the prefix cache could serve)."""
    from rope_ext.research.corpus import BOOKS_DIR, book_text

    ids = tokenizer(book_text(BOOKS_DIR / "news-from-nowhere.txt"), add_special_tokens=False)["input_ids"]
    starts = [1000 + sum(counts[:i]) for i in range(len(counts))]
    return [ids[start:start + count] for start, count in zip(starts, counts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["tiny", "smollm2"], help="one model's phases (default: both)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[4000, 6000, 7000],
                        help="SmolLM2 prompt lengths whose streams cross 8192")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from rope_ext.models.smollm2 import prepare_model
    from rope_ext.models.tiny import build_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="promotion-"))
    smollm2 = prepare_model()
    report = json.loads(args.out.read_text()) if args.out.exists() and args.only else {}
    report.update({"command": "python -m bench.promotion.run", "date": date.today().isoformat(),
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
                   "settings": {side: flags or ["(defaults)"] for side, flags in SIDE.items()}})
    if args.only in (None, "tiny"):
        model, factors, _ = build_tiny_model(workdir, smollm2)
        rng = random.Random(0)
        plans = [([rng.randrange(100, 49000) for _ in range(200)], 400) for _ in range(16)]
        warmup = [([rng.randrange(100, 49000) for _ in range(600)], 8)]  # times a prefill for the estimates
        report["tiny"] = phase(
            "tiny", ["--model", str(model), "--factors", str(factors), "--served-model-name", "tiny", "--dtype",
                     "float32", "--enforce-eager", "--seed", "0", "--max-model-len", str(TINY_MAX_LEN)],
            {"VLLM_CPU_KVCACHE_SPACE": "1"}, "tiny", {"16 streams at concurrency 8": (plans, 8, 0)}, workdir, warmup)
    if args.only in (None, "smollm2"):
        counts = [n for n in args.prompts for _ in range(2)]
        *passages, near, warm = book_passages(AutoTokenizer.from_pretrained(smollm2), [*counts, 8132, 1000])
        cases = {}
        for i, n in enumerate(args.prompts):
            cases[f"{n}-token prompt alone"] = ([(passages[2 * i], 8192 - n + PAST_WINDOW)], 1, 0)
            cases[f"{n}-token prompt beside {CHATS} chats"] = ([(passages[2 * i + 1], 8192 - n + PAST_WINDOW)], 1,
                                                               CHATS)
        cases["8132-token prompt alone"] = ([(near, 100)], 1, 0)
        report["smollm2"] = phase("smollm2", ["--model", str(smollm2), "--served-model-name", "smollm2",
                                              "--enforce-eager", "--seed", "0"],
                                  {"VLLM_CPU_KVCACHE_SPACE": "4"}, "smollm2", cases, workdir, [(warm, 4)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v.get("summary") for k, v in report.items() if isinstance(v, dict) and "summary" in v},
                     indent=2))


if __name__ == "__main__":
    main()
