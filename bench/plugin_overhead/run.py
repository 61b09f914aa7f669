"""Plugin overhead: prefill and decode throughput, our per-request rotary vs stock vLLM's, in one run.

Same model (SmolLM2-135M-Instruct, float32), same engine settings, same batches. The two
engines alternate (stock, plugin, plugin, stock, ...), each in its own process; each engine
times every batch several times and keeps the median. The plugin engine gets a two-step
ladder (plain RoPE to 8192, YaRN to 16384); every request in it runs in the short set
through the stacked table and per-token offsets, so what is measured is the mechanism's cost.

    .venv/bin/python -m bench.plugin_overhead.run   # eager and compiled; writes bench/plugin_overhead/results.json

``--runner V2`` runs both engines under vLLM's V2 model runner, its Triton kernels in Triton's interpreter
(harness/v2_on_cpu.py): the same arrangement for stock and plugin, so the ratio is the plugin's, not the
interpreter's. Every engine reports the runner it used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ENGINE = {"dtype": "float32", "max_model_len": 8192, "enable_prefix_caching": False, "seed": 0,
          "max_num_batched_tokens": 8192, "max_num_seqs": 16}
PREFILL = {"requests": 8, "prompt": 1024}
DECODE = {"requests": 8, "prompt": 32, "new": 128}
MARK = "RESULT "


def measure(model: str, enforce_eager: bool, repeats: int) -> dict:
    """Runs inside the engine's process: median seconds for the prefill and the decode batch."""
    from vllm import LLM, SamplingParams

    from rope_ext.vllm_plugin.runners import model_runner

    llm = LLM(model=model, enforce_eager=enforce_eager, **ENGINE)

    def prompts(n: int, length: int, salt: int) -> list[dict]:
        return [{"prompt_token_ids": [(salt * 7919 + i * 104729 + j * 31) % 40000 + 100 for j in range(length)]}
                for i in range(n)]

    def timed(batch: list[dict], params: SamplingParams) -> float:
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - start

    one = SamplingParams(max_tokens=1, temperature=0)
    decode = SamplingParams(max_tokens=DECODE["new"], temperature=0, ignore_eos=True)
    timed(prompts(2, 64, 0), one)  # warm-up
    prefill_s = [timed(prompts(PREFILL["requests"], PREFILL["prompt"], r + 1), one) for r in range(repeats)]
    decode_s = [timed(prompts(DECODE["requests"], DECODE["prompt"], r + 100), decode) for r in range(repeats)]
    return {
        "prefill_tokens_per_s": PREFILL["requests"] * PREFILL["prompt"] / statistics.median(prefill_s),
        "decode_tokens_per_s": DECODE["requests"] * DECODE["new"] / statistics.median(decode_s),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "runner": model_runner(llm.llm_engine.vllm_config),
    }


def bench_ladder(model: Path) -> Path:
    """The plugin engines' two-step ladder: plain RoPE to 8192, YaRN to 16384."""
    from rope_ext.baselines import baseline_ladder
    from rope_ext.factors import save_ladder
    from rope_ext.hf_config import model_info

    factors = Path("/tmp/longrope-bench-ladder.json")
    save_ladder(baseline_ladder(model_info(json.loads((model / "config.json").read_text())), "yarn", 16384), factors)
    return factors


def run_engine(mode: str, model: str, factors: str, eager: bool, repeats: int,
               module: str = "bench.plugin_overhead.run", runner: str = "V1") -> dict:
    """``module --measure`` in a fresh process, as the stock or the plugin engine; its RESULT line."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    if runner == "V2":
        from harness.v2_on_cpu import v2_environment

        env.update(v2_environment(env))
    if mode == "plugin":
        env["LONGROPE_FACTORS"] = factors
        env.pop("LONGROPE_PLUGIN", None)
    else:
        env["LONGROPE_PLUGIN"] = "0"
        env.pop("LONGROPE_FACTORS", None)
    out = subprocess.run(
        [sys.executable, "-m", module, "--measure", model, "--repeats", str(repeats)]
        + (["--eager"] if eager else []),
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{mode} engine failed:\n{out.stderr[-5000:]}")
    line = next(line for line in reversed(out.stdout.splitlines()) if line.startswith(MARK))
    result = json.loads(line[len(MARK):])
    if result.get("runner", runner) != runner:
        raise SystemExit(f"{mode} engine ran under vLLM's {result['runner']} model runner, not {runner}")
    return result


def compare(model: Path, factors: Path, eager: bool, rounds: int, repeats: int, runner: str = "V1") -> dict:
    """Stock and plugin engines alternating for ``rounds``; the best engine of each kind kept.

    The order flips every round (stock, plugin, plugin, stock, ...) so that a drift of the
    machine over the run favours neither.
    """
    label = "eager" if eager else "compiled"
    runs: dict[str, list[dict]] = {"stock": [], "plugin": []}
    for r in range(rounds):
        for mode in ("stock", "plugin") if r % 2 == 0 else ("plugin", "stock"):
            print(f"{label} round {r + 1}/{rounds}: {mode} engine ...", file=sys.stderr, flush=True)
            runs[mode].append(run_engine(mode, str(model), str(factors), eager, repeats, runner=runner))
            print(f"  {runs[mode][-1]['prefill_tokens_per_s']:.0f} prefill tok/s, "
                  f"{runs[mode][-1]['decode_tokens_per_s']:.1f} decode tok/s", file=sys.stderr, flush=True)

    def best(mode: str, key: str) -> float:
        return max(run[key] for run in runs[mode])

    ratios = {key: best("plugin", key) / best("stock", key) for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    return {"engine": {**ENGINE, "enforce_eager": eager}, "runner": runner, "runs": runs,
            "ratio_plugin_over_stock": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each batch per engine")
    parser.add_argument("--rounds", type=int, default=3, help="stock/plugin engine pairs per mode, alternating")
    parser.add_argument("--modes", default="eager,compiled", help="eager, compiled (vLLM's default), or both")
    parser.add_argument("--runner", choices=("V1", "V2"), default="V1",
                        help="vLLM's model runner for both engines (V2: Triton's interpreter, harness/v2_on_cpu.py)")
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)  # for --measure
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    if args.measure:
        print(MARK + json.dumps(measure(args.measure, args.eager, args.repeats)))  # vLLM logs to stdout too
        return

    from rope_ext.models.smollm2 import prepare_model

    model = prepare_model()
    factors = bench_ladder(model)
    modes = args.modes.split(",")
    result = {
        "command": f"python -m bench.plugin_overhead.run --modes {args.modes} --rounds {args.rounds} "
                   f"--repeats {args.repeats} --runner {args.runner}",
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "prefill_batch": PREFILL,
        "decode_batch": DECODE,
        "modes": {mode: compare(model, factors, mode == "eager", args.rounds, args.repeats, args.runner)
                  for mode in modes},
        "target": ">= 0.99 for both",
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({mode: r["ratio_plugin_over_stock"] for mode, r in result["modes"].items()}, indent=2))


if __name__ == "__main__":
    main()
