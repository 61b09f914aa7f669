"""Load: 200 requests at concurrency 16 against `longrope serve`, mixing every regime, with disconnects.

The tiny random-weight Llama of the tests (W0 = 256, sets 256 / 512 / 1024), so that long and
promoted requests cost seconds, not minutes, on this CPU (SmolLM2 prefills ~230 tokens/s here,
and every long request there is > 8192 tokens); policy dynamic. The mix: short prompts, long
prompts (the long set), prompts just under 256 whose budget crosses it (promoted, some twice),
prompts pinned to the mid set by the `rope_set` field, and streams the client drops after a
few chunks. Checks: no errors, every kept stream complete and well-formed (role first, one
finish_reason, usage, [DONE]), the engine's running count back to zero, and the server's
resident memory at start, after warm-up and at the end.

    .venv/bin/python -m bench.load.run      # writes bench/load/results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

from harness.servers import longrope_serve
from rope_ext.models.tiny import TINY_MAX_LEN

HERE = Path(__file__).resolve().parent
NAME = "tiny"
ENGINE = ["--dtype", "float32", "--enforce-eager", "--seed", "0", "--max-model-len", str(TINY_MAX_LEN)]


def rss_mb(pid: int) -> float:
    """Resident memory of the server process (the API process; the engine runs in its own)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def running(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M))


def workload(n: int, seed: int) -> list[dict]:
    """Request plans: kind, prompt token ids, max_tokens, and whether the client leaves early."""
    rng = random.Random(seed)

    def ids(count: int) -> list[int]:
        return [rng.randrange(100, 49000) for _ in range(count)]

    plans = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.15:
            plans.append({"kind": "long", "prompt": ids(rng.randrange(520, 900)), "max_tokens": 16})
        elif roll < 0.30:  # starts short (< 256), its budget crosses 256, some cross 512 too
            plans.append({"kind": "promoted", "prompt": ids(rng.randrange(200, 250)),
                          "max_tokens": rng.choice([40, 80, 320])})
        elif roll < 0.40:
            plans.append({"kind": "disconnect", "prompt": ids(50), "max_tokens": 400})
        elif roll < 0.47:  # pinned by the top-level field: never promoted
            plans.append({"kind": "pinned", "prompt": ids(rng.randrange(200, 250)), "max_tokens": 40,
                          "rope_set": "mid"})
        else:
            plans.append({"kind": "short", "prompt": ids(rng.randrange(10, 120)),
                          "max_tokens": rng.choice([8, 16, 32])})
    return plans


async def one(client: httpx.AsyncClient, base: str, plan: dict) -> dict:
    body = {"model": NAME, "prompt": plan["prompt"], "max_tokens": plan["max_tokens"], "temperature": 0.7,
            "seed": 1, "stream": True, "stream_options": {"include_usage": True}}
    if "rope_set" in plan:
        body["rope_set"] = plan["rope_set"]
    started = time.perf_counter()
    lines: list[str] = []
    async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"kind": plan["kind"], "error": f"HTTP {response.status_code}: {await response.aread()!r}"}
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
            if plan["kind"] == "disconnect" and len(lines) >= 4:
                return {"kind": "disconnect", "ok": True, "seconds": time.perf_counter() - started}
    return {"kind": plan["kind"], **check_stream(lines), "seconds": time.perf_counter() - started,
            "rope_set": response.headers.get("x-rope-set")}


def check_stream(lines: list[str]) -> dict:
    """Well-formed: all `data:` lines, one id, exactly one finish_reason, a usage chunk, then [DONE]."""
    if not lines or lines[-1] != "data: [DONE]" or not all(line.startswith("data: ") for line in lines):
        return {"ok": False, "error": "bad framing"}
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    if any("error" in c for c in chunks):
        return {"ok": False, "error": "error event"}
    finishes = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    usage = chunks[-1].get("usage")
    ok = len({c["id"] for c in chunks}) == 1 and len(finishes) == 1 and usage is not None
    return {"ok": ok, "completion_tokens": usage and usage["completion_tokens"],
            "promotions": finishes[0].get("rope_promotions") if finishes else None}


async def drive(base: str, plans: list[dict], concurrency: int) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900)) as client:
        async def guarded(plan: dict) -> dict:
            async with gate:
                try:
                    return await one(client, base, plan)
                except Exception as exc:  # noqa: BLE001 - counted as an error in the report
                    return {"kind": plan["kind"], "ok": False, "error": repr(exc)}

        return await asyncio.gather(*(guarded(p) for p in plans))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()

    from rope_ext.models.smollm2 import prepare_model
    from rope_ext.models.tiny import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="load-"))
    model, factors, _ = build_tiny_model(tmp, prepare_model())
    plans = workload(args.requests, seed=0)
    server = longrope_serve(["--model", str(model), "--factors", str(factors), "--served-model-name", NAME, *ENGINE],
                            tmp / "server.log", {"VLLM_CPU_KVCACHE_SPACE": "1"})
    with server:
        pid = server.proc.pid
        rss = {"start": rss_mb(pid)}
        asyncio.run(drive(server.base, [p for p in workload(32, seed=1) if p["kind"] == "short"], args.concurrency))
        rss["after_warmup"] = rss_mb(pid)
        started = time.perf_counter()
        results = asyncio.run(drive(server.base, plans, args.concurrency))
        elapsed = time.perf_counter() - started
        deadline = time.time() + 60
        while running(server.base) > 0 and time.time() < deadline:
            time.sleep(0.5)
        running_after = running(server.base)
        rss["end"] = rss_mb(pid)

    by_kind: dict[str, dict] = {}
    for r in results:
        entry = by_kind.setdefault(r["kind"], {"requests": 0, "ok": 0})
        entry["requests"] += 1
        entry["ok"] += bool(r.get("ok"))
    for r in results:  # a pinned stream that moved, or ran in another set, is wrong
        if r["kind"] == "pinned" and r.get("ok") and (r.get("promotions") or r.get("rope_set") != "mid"):
            r.update(ok=False, error=f"pinned stream ran in {r.get('rope_set')}, promotions {r.get('promotions')}")
    errors = [r for r in results if not r.get("ok")]
    promoted = sum(1 for r in results if r.get("promotions"))
    report = {
        "command": "python -m bench.load.run",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "server": {"model": "tiny random-weight Llama (rope_ext/models/tiny.py)",
                   "ladder": "short 256, mid 512, long 1024",
                   "policy": "dynamic", "engine_flags": ENGINE},
        "requests": args.requests, "concurrency": args.concurrency, "seconds": round(elapsed, 1),
        "by_kind": by_kind, "requests_promoted": promoted, "errors": len(errors), "error_samples": errors[:5],
        "engine_running_after": running_after, "server_rss_mb": {k: round(v, 1) for k, v in rss.items()},
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if errors or running_after:
        sys.exit(1)


if __name__ == "__main__":
    main()
