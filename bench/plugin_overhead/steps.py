"""Where a compiled decode step's time goes, stock vLLM against the plugin, engine in-process.

``run.py`` measures whole batches through vLLM's multiprocess engine; this one runs the engine
core in the benchmark's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and times every step
of a decode batch twice: the whole ``execute_model`` (input preparation, the plugin's offset
fill, the model, sampling) and the model forward alone (the compiled graph). If the plugin's
stacked table or offsets changed what inductor makes of the rotary lookup, the forward alone
would be slower; if its per-step Python cost mattered, ``execute_model`` minus forward would.

    .venv/bin/python -m bench.plugin_overhead.steps   # compiled, 2 ABBA rounds; writes steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

from bench.plugin_overhead.run import MARK

HERE = Path(__file__).resolve().parent


def measure(model: str, eager: bool, repeats: int) -> dict:
    """In the engine's process: per batch, its wall time and the median step times of full decode steps."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from bench.plugin_overhead.run import DECODE, ENGINE

    steps: list[tuple[int, float, float]] = []  # (tokens, execute_model s, forward s)
    execute, forward = GPUModelRunner.execute_model, GPUModelRunner._model_forward
    forward_s: list[float] = []

    def timed_execute(self, scheduler_output, *args, **kwargs):
        start = time.perf_counter()
        out = execute(self, scheduler_output, *args, **kwargs)
        steps.append((scheduler_output.total_num_scheduled_tokens, time.perf_counter() - start, forward_s[-1]))
        return out

    def timed_forward(self, *args, **kwargs):
        start = time.perf_counter()
        out = forward(self, *args, **kwargs)
        forward_s.append(time.perf_counter() - start)
        return out

    # On the base class: the plugin's mixin overrides sit above it, so their cost is inside execute_model.
    GPUModelRunner.execute_model, GPUModelRunner._model_forward = timed_execute, timed_forward
    llm = LLM(model=model, enforce_eager=eager, **ENGINE)
    n, new = DECODE["requests"], DECODE["new"]
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)

    def batch(salt: int) -> list[dict]:
        return [{"prompt_token_ids": [(salt * 7919 + i * 104729 + j * 31) % 40000 + 100
                                      for j in range(DECODE["prompt"])]} for i in range(n)]

    llm.generate(batch(1), params, use_tqdm=False)  # warm-up
    runs = []
    for r in range(repeats):
        steps.clear()
        start = time.perf_counter()
        llm.generate(batch(r + 100), params, use_tqdm=False)
        wall = time.perf_counter() - start
        decode = [(e, f) for tokens, e, f in steps if tokens == n]  # every request decoding one token
        runs.append({"wall_s": wall, "decode_steps": len(decode),
                     "execute_model_ms": 1e3 * statistics.median(e for e, _ in decode),
                     "forward_ms": 1e3 * statistics.median(f for _, f in decode),
                     "outside_forward_ms": 1e3 * statistics.median(e - f for e, f in decode)})
    return {"runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help="eager instead of compiled (vLLM's default)")
    parser.add_argument("--repeats", type=int, default=4, help="timed decode batches per engine")
    parser.add_argument("--rounds", type=int, default=2, help="stock/plugin engine pairs, alternating")
    parser.add_argument("--out", type=Path, default=HERE / "steps.json")
    args = parser.parse_args()
    if args.measure:
        print(MARK + json.dumps(measure(args.measure, args.eager, args.repeats)))
        return

    from bench.plugin_overhead.run import DECODE, ENGINE, bench_ladder, run_engine
    from rope_ext.models.smollm2 import prepare_model

    model = prepare_model()
    factors = bench_ladder(model)
    runs: dict[str, list[dict]] = {"stock": [], "plugin": []}
    for r in range(args.rounds):
        for mode in ("stock", "plugin") if r % 2 == 0 else ("plugin", "stock"):
            print(f"round {r + 1}/{args.rounds}: {mode} engine ...", file=sys.stderr, flush=True)
            runs[mode] += run_engine(mode, str(model), str(factors), args.eager, args.repeats,
                                     module="bench.plugin_overhead.steps")["runs"]

    def median(mode: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[mode])

    keys = ("wall_s", "execute_model_ms", "forward_ms", "outside_forward_ms")
    summary = {mode: {key: median(mode, key) for key in keys} for mode in runs}
    result = {
        "command": f"python -m bench.plugin_overhead.steps --rounds {args.rounds} --repeats {args.repeats}"
                   + (" --eager" if args.eager else ""),
        "date": date.today().isoformat(),
        "engine": {**ENGINE, "enforce_eager": args.eager, "multiprocessing": False},
        "decode_batch": DECODE,
        "median_over_batches": summary,
        "decode_throughput_ratio_plugin_over_stock": summary["stock"]["wall_s"] / summary["plugin"]["wall_s"],
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_over_batches", "decode_throughput_ratio_plugin_over_stock")},
                     indent=2))


if __name__ == "__main__":
    main()
