"""Promotion without a stall: streams that cross a window, with side prefills off and on, in one run.

Two servers per model, one after the other: `--side-prefill-max-lead 0 --rope-start-rule window` (the
switch prefills everything, as before) and the defaults (side prefills; a request with too little room
to hide the next set's prefill starts in that set). Each streamed completion asks for one logprob per
token, so the client knows when each token arrived; the gap before the first token after a switch is
that switch's stall, set against the same request's median inter-token latency (`stall_over_median_itl`).

- tiny: the tests' random-weight Llama (sets 256 / 512 / 1024), 16 streams at concurrency 8, each from
  a 200-token prompt for 400 tokens (crossing 256 and 512); throughput is their completion tokens over
  the wall time.
- smollm2: SmolLM2 with its shipped ladder, one stream at a time: a ~6000-token passage of a book
  crossing 8192, and one 60 tokens below it (8132), `--enforce-eager`.

    .venv/bin/python -m bench.promotion.run     # writes bench/promotion/results.json (~20 min on 2 cores)
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


async def stream(client: httpx.AsyncClient, base: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One greedy streamed completion: each token's arrival time and the promotions it went through."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "stream": True}
    arrivals: list[float] = []
    promotions, start_set = [], None
    async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
        response.raise_for_status()
        start_set = response.headers.get("x-rope-set")  # sent before the first token: the start set
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            for choice in json.loads(line[6:])["choices"]:
                arrivals += [now] * len((choice.get("logprobs") or {}).get("tokens") or [])
                if choice.get("finish_reason"):
                    promotions = choice.get("rope_promotions") or []
    return {"prompt_tokens": len(prompt), "arrivals": arrivals, "promotions": promotions, "start_set": start_set}


def switches(result: dict) -> list[dict]:
    """Each switch's stall (gap before its first token) over the request's median inter-token latency."""
    arrivals = result["arrivals"]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    median = statistics.median(gaps)
    rows = []
    for p in result["promotions"]:
        first_after = p["at_tokens"] - result["prompt_tokens"]  # index of the first token generated after it
        stall = arrivals[first_after] - arrivals[first_after - 1]
        # A stream whose chunks reached the client in bursts has no inter-token latency to compare with.
        ratio = round(stall / median, 2) if median >= BURST_S else None
        rows.append({"from": p["from"], "to": p["to"], "at_tokens": p["at_tokens"], "stall_s": round(stall, 4),
                     "median_itl_s": round(median, 4), "stall_over_median_itl": ratio})
    return rows


def counters(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {name: sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))
            for name in COUNTERS}


async def run_streams(base: str, model: str, plans: list[tuple[list[int], int]], concurrency: int) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800)) as client:
        async def guarded(prompt: list[int], max_tokens: int) -> dict:
            async with gate:
                return await stream(client, base, model, prompt, max_tokens)

        return await asyncio.gather(*(guarded(p, m) for p, m in plans))


def phase(label: str, serve_args: list[str], env: dict[str, str], model: str, plans: list[tuple[list[int], int]],
          concurrency: int, workdir: Path, warmup: list[tuple[list[int], int]]) -> dict:
    """Start a server, warm it up, run ``plans``; per side setting, every switch and the totals."""
    out = {}
    for side, flags in SIDE.items():
        print(f"[{time.strftime('%H:%M:%S')}] {label}: side prefill {side}", flush=True)
        with longrope_serve([*serve_args, *flags], workdir / f"{label}-{side}.log", env, start_timeout=900) as server:
            asyncio.run(run_streams(server.base, model, warmup, 1))
            before = counters(server.base)
            started = time.perf_counter()
            results = asyncio.run(run_streams(server.base, model, plans, concurrency))
            seconds = time.perf_counter() - started
            after = counters(server.base)
        tokens = sum(len(r["arrivals"]) for r in results)
        out[side] = {
            "streams": [{"prompt_tokens": r["prompt_tokens"], "start_set": r["start_set"],
                         "tokens": len(r["arrivals"]), "switches": switches(r)} for r in results],
            "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 2),
            **{name: after[name] - before[name] for name in COUNTERS},
        }
    every = {side: [s["stall_over_median_itl"] for st in out[side]["streams"] for s in st["switches"]
                    if s["stall_over_median_itl"] is not None] for side in SIDE}
    out["summary"] = {
        "max_stall_over_median_itl": {side: max(v, default=None) for side, v in every.items()},
        "median_stall_over_median_itl": {side: statistics.median(v) if v else None for side, v in every.items()},
        "switches_in_bursty_streams": {side: sum(s["stall_over_median_itl"] is None for st in out[side]["streams"]
                                                 for s in st["switches"]) for side in SIDE},
        "throughput_on_over_off": round(out["on"]["tokens_per_s"] / out["off"]["tokens_per_s"], 3),
    }
    return out


def book_passages(tokenizer, counts: list[int]) -> list[list[int]]:
    """Passages of a book, one after another (no two share a prefix the prefix cache could serve)."""
    from rope_ext.research.corpus import BOOKS_DIR, book_text

    ids = tokenizer(book_text(BOOKS_DIR / "news-from-nowhere.txt"), add_special_tokens=False)["input_ids"]
    starts = [1000 + sum(counts[:i]) for i in range(len(counts))]
    return [ids[start:start + count] for start, count in zip(starts, counts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["tiny", "smollm2"], help="one model's phases (default: both)")
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
            {"VLLM_CPU_KVCACHE_SPACE": "1"}, "tiny", plans, 8, workdir, warmup)
    if args.only in (None, "smollm2"):
        far, near, warm = book_passages(AutoTokenizer.from_pretrained(smollm2), [6000, 8132, 1000])
        plans = [(far, 8192 - 6000 + 40), (near, 100)]
        warmup = [(warm, 4)]
        report["smollm2"] = phase("smollm2", ["--model", str(smollm2), "--served-model-name", "smollm2",
                                              "--enforce-eager", "--seed", "0"],
                                  {"VLLM_CPU_KVCACHE_SPACE": "4"}, "smollm2", plans, 1, workdir, warmup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v.get("summary") for k, v in report.items() if isinstance(v, dict) and "summary" in v},
                     indent=2))


if __name__ == "__main__":
    main()
