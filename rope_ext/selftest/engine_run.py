"""Runs one vLLM engine over a batch of requests and writes what came out, as JSON.

Each engine runs in its own process (``run_in_process``, i.e. ``python -m
rope_ext.selftest.engine_run SPEC OUT``): the plugin switch and factor file are environment
variables read when vLLM starts, and a fresh process frees the engine's memory when it ends.

SPEC: {"model": dir, "engine": {LLM kwargs},
       "requests": [{"prompt_token_ids", "max_tokens", "rope_set"?, "prompt_logprobs"? (default true), "seed"?}],
       "waves": optional list of lists of request indices sent one after another}
OUT: {"results": per request, "metrics": engine counters, "runner": the model runner vLLM chose, "V1" or "V2"}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rope_ext import environment


class EngineRunFailed(AssertionError):
    """The engine process exited non-zero; the message holds the ends of its output."""


def run_in_process(spec: dict, env: dict[str, str], workdir: Path, name: str, timeout: float = 900) -> dict:
    """Run ``spec`` in a fresh Python process with ``env`` added; return its results."""
    spec_path, out_path = workdir / f"{name}-spec.json", workdir / f"{name}-out.json"
    spec_path.write_text(json.dumps(spec))
    full_env = {**os.environ, environment.CPU_KV_CACHE_GIB: "1", **env}
    result = subprocess.run(
        [sys.executable, "-m", "rope_ext.selftest.engine_run", str(spec_path), str(out_path)],
        env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise EngineRunFailed(f"engine run {name} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return json.loads(out_path.read_text())


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    from rope_ext.vllm_plugin.runners import model_runner

    llm = LLM(model=spec["model"], **spec["engine"])

    def params(req: dict) -> SamplingParams:
        extra = {"rope_set": req["rope_set"]} if req.get("rope_set") else None
        # prompt logprobs make vLLM skip the prefix cache, so the prefix-cache test turns them off
        prompt_logprobs = 0 if req.get("prompt_logprobs", True) else None
        seed = req.get("seed")  # seeded requests sample at temperature 1; the others are greedy
        return SamplingParams(
            temperature=0.0 if seed is None else 1.0, seed=seed, max_tokens=req["max_tokens"],
            prompt_logprobs=prompt_logprobs, logprobs=0, extra_args=extra,
            detokenize=not spec["engine"].get("skip_tokenizer_init", False),
        )

    requests = spec["requests"]
    waves = spec.get("waves") or [list(range(len(requests)))]
    results: list[dict | None] = [None] * len(requests)
    for wave in waves:
        outputs = llm.generate(
            [{"prompt_token_ids": requests[i]["prompt_token_ids"]} for i in wave],
            [params(requests[i]) for i in wave],
            use_tqdm=False,
        )
        for i, out in zip(wave, outputs):
            tokens = list(out.prompt_token_ids)
            completion = out.outputs[0]
            results[i] = {
                "tokens": list(completion.token_ids),
                "token_logprobs": [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)],
                "prompt_logprobs": [lp[t].logprob for lp, t in zip((out.prompt_logprobs or [])[1:], tokens[1:])],
                "num_cached_tokens": out.num_cached_tokens,
            }
    metrics = {}
    if spec["engine"].get("disable_log_stats") is False:  # LLM keeps no stats by default
        metrics = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    return {"results": results, "metrics": metrics, "runner": model_runner(llm.llm_engine.vllm_config)}


if __name__ == "__main__":
    spec_path, out_path = sys.argv[1:3]
    with open(spec_path) as f:
        spec = json.load(f)
    with open(out_path, "w") as f:
        json.dump(run(spec), f)
