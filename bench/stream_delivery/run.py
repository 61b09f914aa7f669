"""How streamed tokens reach the client, and where the CPU goes meanwhile: why streams arrive in bursts.

`longrope serve` with the tiny model runs one request at a time (--max-num-seqs 1) while four clients, each
its own process, stream 300-token completions. Per stream: the chunks, the tokens in each (more than one
means vLLM merged outputs the API process had not taken yet), and the gaps between arrivals. Meanwhile the
CPU share of each of the server's processes (engine core, worker, API) is sampled. On CPU vLLM runs the
worker in its own process even at TP 1 (`CpuPlatform.check_and_update_config` turns the "uni" executor into
"mp"), and the engine core spins on the shared-memory queue to it. Then the same with the worker inside the
engine core process (VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the "uni" executor, vLLM's arrangement at TP 1 on
GPU), where no process spins on that queue.

    .venv/bin/python -m bench.stream_delivery.run   # writes bench/stream_delivery/results.json
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx
import psutil

from harness.servers import longrope_serve

HERE = Path(__file__).resolve().parent
STREAMS, TOKENS = 4, 300


def stream(base: str, out: dict, index: int, tokens: int) -> None:
    """One streamed completion: (arrival time, tokens in the chunk) per chunk."""
    body = {"model": "tiny", "prompt": [7] * 20, "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "rope_set": "long", "logprobs": 0}
    chunks = []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=900) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices")
                if choices:
                    chunks.append((time.monotonic(), len((choices[0].get("logprobs") or {}).get("tokens") or [])))
    out[index] = chunks


def measure(model_dir: Path, factors: Path, env: dict[str, str], log: Path) -> dict:
    from rope_ext.models.tiny import TINY_MAX_LEN

    server = longrope_serve(["--model", str(model_dir), "--factors", str(factors), "--served-model-name", "tiny",
                             "--dtype", "float32", "--enforce-eager", "--max-model-len", str(TINY_MAX_LEN),
                             "--max-num-seqs", "1"], log, {"VLLM_CPU_KVCACHE_SPACE": "1", **env})
    with server:
        stream(server.base, {}, 0, 8)  # warm-up
        processes = {p.name(): p for p in psutil.Process(server.proc.pid).children(recursive=True)}
        processes["API"] = psutil.Process(server.proc.pid)
        with multiprocessing.Manager() as manager:
            out = manager.dict()
            clients = [multiprocessing.Process(target=stream, args=(server.base, out, i, TOKENS))
                       for i in range(STREAMS)]
            for process in processes.values():
                process.cpu_percent(None)
            for client in clients:
                client.start()
            time.sleep(3)
            cpu = {name: process.cpu_percent(None) for name, process in processes.items()}
            for client in clients:
                client.join()
            chunks = dict(out)
    streams = []
    for index in range(STREAMS):
        arrivals = chunks[index]
        gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]
        streams.append({"chunks": len(arrivals), "tokens": sum(n for _, n in arrivals),
                        "chunks_with_more_than_one_token": sum(n > 1 for _, n in arrivals),
                        "gaps_under_1ms": sum(g < 0.001 for g in gaps), "median_gap_ms": 1000 * statistics.median(gaps),
                        "max_gap_ms": 1000 * max(gaps)})
    return {"cpu_percent_while_streaming": cpu, "streams": streams}


def main() -> None:
    from rope_ext.models.smollm2 import prepare_model
    from rope_ext.models.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="stream-delivery-"))
    model_dir, factors, _ = build_tiny_model(work, prepare_model())
    result = {
        "command": "python -m bench.stream_delivery.run",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "setup": f"tiny model, --max-num-seqs 1, {STREAMS} client processes streaming {TOKENS} tokens each",
        "worker in its own process (vLLM's default on CPU)": measure(model_dir, factors, {}, work / "mp.log"),
        "worker in the engine core process (as on GPU at TP 1)": measure(
            model_dir, factors, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, work / "inproc.log"),
    }
    (HERE / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
