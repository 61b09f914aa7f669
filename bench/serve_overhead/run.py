"""Serving overhead: `longrope serve` against stock `vllm serve`, same model, engine settings and load.

The load is vLLM's own `vllm bench serve` (streaming chat, random dataset, fixed seed) at
concurrency 1 and 8. Both servers run SmolLM2-135M-Instruct with the same engine flags; ours
with its ladder and the plugin, stock vLLM with the plugin switched off. The servers run in
ABBA order (vllm, ours, ours, vllm), each a fresh process, so drift over the run favours
neither; results are ratios of the means, ours / vllm.

    .venv/bin/python -m bench.serve_overhead.run      # writes bench/serve_overhead/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from harness.servers import longrope_serve, vllm_serve

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Prefix caching off: the loads reuse the seed, so a later load's prompts would hit blocks an earlier
# one left, and how many depends on cache state, not on the server (TTFT p50 moved ±25 % with it).
ENGINE = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "8192", "--seed", "0",
          "--no-enable-prefix-caching"]
NAME = "smollm2"
LOADS = [{"concurrency": 1, "prompts": 16}, {"concurrency": 8, "prompts": 96}]
INPUT_LEN, OUTPUT_LEN = 256, 64
ORDER = ["vllm", "ours", "ours", "vllm"]
KEYS = ["request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms"]


def bench(base: str, model_dir: str, load: dict, out: Path) -> dict:
    argv = [sys.executable, "-m", "rope_ext.vllm_cli", "bench", "serve", "--backend", "openai-chat",
            "--endpoint", "/v1/chat/completions", "--base-url", base, "--model", NAME, "--tokenizer", model_dir,
            "--dataset-name", "random", "--random-input-len", str(INPUT_LEN), "--random-output-len", str(OUTPUT_LEN),
            "--num-prompts", str(load["prompts"]), "--max-concurrency", str(load["concurrency"]), "--seed", "0",
            "--ignore-eos", "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-filename", str(out)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OPENAI_API_KEY": "x"})
    if done.returncode != 0:
        raise SystemExit(f"vllm bench serve failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    if result.get("failed", 0):
        raise SystemExit(f"{result['failed']} requests failed against {base}")
    return {key: result[key] for key in KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()

    from rope_ext.models.smollm2 import prepare_model

    model = str(prepare_model())
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    tmp = Path(tempfile.mkdtemp(prefix="serve-overhead-"))
    runs: dict[str, dict[str, list[dict]]] = {}
    servers = {
        "vllm": lambda log: vllm_serve(model, ["--served-model-name", NAME, *ENGINE], log, env),
        "ours": lambda log: longrope_serve(["--model", model, "--served-model-name", NAME, *ENGINE], log, env),
    }
    for turn, label in enumerate(ORDER):
        print(f"{label} ({turn + 1}/{len(ORDER)}): starting ...", file=sys.stderr, flush=True)
        with servers[label](tmp / f"{label}-{turn}.log") as server:
            bench(server.base, model, {"concurrency": 1, "prompts": 4}, tmp / f"{label}-{turn}-warmup.json")
            for load in LOADS:
                key = f"concurrency {load['concurrency']}"
                result_file = tmp / f"{label}-{turn}-c{load['concurrency']}.json"
                runs.setdefault(key, {}).setdefault(label, []).append(bench(server.base, model, load, result_file))
                print(f"  {key}: {runs[key][label][-1]}", file=sys.stderr, flush=True)

    def mean(results: list[dict], key: str) -> float:
        return sum(r[key] for r in results) / len(results)

    ratios = {load: {key: mean(vals["ours"], key) / mean(vals["vllm"], key) for key in KEYS}
              for load, vals in runs.items()}
    result = {
        "command": "python -m bench.serve_overhead.run",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "engine_flags": ENGINE,
        "load": {"tool": "vllm bench serve", "backend": "openai-chat", "dataset": "random", "input_len": INPUT_LEN,
                 "output_len": OUTPUT_LEN, "seed": 0, "loads": LOADS},
        "order": ORDER,
        "runs": runs,
        "ratio_ours_over_vllm": ratios,
        "targets": {"output_throughput": ">= 0.98", "median_ttft_ms": "<= 1.03"},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
