"""Runs one vLLM engine over a batch of requests and writes what came out, as JSON.

Each engine runs in its own process (``python -m tests.vllm_plugin.engine_run SPEC OUT``):
the plugin switch and factor file are environment variables read when vLLM starts, and a
fresh process frees the engine's memory when it ends.

SPEC: {"model": dir, "engine": {LLM kwargs},
       "requests": [{"prompt_token_ids", "max_tokens", "rope_set"?, "prompt_logprobs"? (default true), "seed"?}],
       "waves": optional list of lists of request indices sent one after another}
"""

import json
import sys


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec["engine"])

    def params(req: dict) -> SamplingParams:
        extra = {"rope_set": req["rope_set"]} if req.get("rope_set") else None
        # prompt logprobs make vLLM skip the prefix cache, so the prefix-cache test turns them off
        prompt_logprobs = 0 if req.get("prompt_logprobs", True) else None
        seed = req.get("seed")  # seeded requests sample at temperature 1; the others are greedy
        return SamplingParams(
            temperature=0.0 if seed is None else 1.0, seed=seed, max_tokens=req["max_tokens"],
            prompt_logprobs=prompt_logprobs, logprobs=0, extra_args=extra,
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
    return {"results": results, "metrics": metrics}


if __name__ == "__main__":
    spec_path, out_path = sys.argv[1:3]
    with open(spec_path) as f:
        spec = json.load(f)
    with open(out_path, "w") as f:
        json.dump(run(spec), f)
