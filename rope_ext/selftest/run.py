"""``longrope selftest``: proof, on this machine's vLLM (CPU or CUDA), that every request is rotated
with its own factor set.

It builds the tiny three-set model, runs a batch that mixes every set with chunked prefill and
preemption through the plugin engine, compiled and then eager, and compares each request with
the transformers reference for its set (``reference.compare``). With ``--model`` it does the same
for one short and one long request on that model. Each engine runs in its own process.

``--compare-modes`` runs the tiny batch under each setting a deployment may flip as well (``modes_for``):
on CUDA async scheduling off and piecewise CUDA graphs alone, ngram speculation, and on CUDA a wave per batch
size that its graphs pad or not. Every row names the model runner vLLM chose for its engine (V1 or V2: the
plugin follows vLLM's choice), so a table says which runner it proved.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rope_ext import environment
from rope_ext.factors import Ladder, save_ladder

# "compiled" is vLLM's defaults: torch.compile, and on CUDA also CUDA graphs and async scheduling.
MODES = {"compiled": {}, "eager": {"enforce_eager": True}}
# A model-free drafter: the plugin allows it (engine_checks.py); its drafts are verified with each request's set.
# It matches down to one token, so the tiny model's decodes (which seldom repeat a pair) still get drafts.
NGRAM = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                "prompt_lookup_max": 4}}
# On CUDA vLLM's default graph mode replays full graphs for decode batches and piecewise ones for mixed batches
# (V2 captures both itself, with the model state's inputs); this row runs piecewise graphs only, so a difference
# in "compiled" alone points at the full graphs.
PIECEWISE = {"compilation_config": {"cudagraph_mode": "PIECEWISE"}}
# Decode batch sizes checked on CUDA: 1 is captured as it is, 3, 5, 17 and 33 are padded to a captured size.
CUDA_BATCH_SIZES = (1, 3, 5, 17, 33)
# The tiny model's groups: every set, chunked prefill (mixed) and preemption (preempting).
TINY_GROUPS = ("mixed", "preempting")


@dataclass
class Row:
    model: str
    mode: str
    set_name: str
    runner: str = ""
    requests: int = 0
    steps: int = 0
    equal: int = 0
    max_delta: float = 0.0
    problem: str | None = None
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.problem is None and self.requests > 0


class Progress:
    """One line per stage on stderr, with the seconds since the start (engines take minutes)."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.0f} s] {text}", file=sys.stderr, flush=True)


def expected_set(ladder: Ladder, request: dict) -> str:
    """The set the engine must use: the plugin's own rule (pinned, else the budget rule)."""
    from rope_ext.selection import engine_set

    index = engine_set(ladder, len(request["prompt_token_ids"]), request["max_tokens"], request.get("rope_set"))
    return ladder.sets[index].name


def compare_results(model: str, mode: str, ladder: Ladder, requests: list[dict], results: list[dict],
                    references: list, runner: str = "") -> list[Row]:
    """One row per set: the requests of that set, their compared steps, equal tokens, largest |Δ logprob|."""
    from rope_ext.selftest.reference import compare

    rows: dict[str, Row] = {name: Row(model, mode, name, runner) for name in ladder.names}
    for i, (request, got, ref) in enumerate(zip(requests, results, references)):
        row = rows[expected_set(ladder, request)]
        prompt_logprobs = got["prompt_logprobs"] if request.get("prompt_logprobs", True) else None
        result = compare(ref, got["tokens"], got["token_logprobs"], prompt_logprobs)
        row.requests += 1
        row.steps += result.steps
        row.equal += result.equal_tokens
        row.max_delta = max(row.max_delta, result.max_delta)
        if result.problem and row.problem is None:
            row.problem = f"request {i}: {result.problem}"
    return [row for row in rows.values() if row.requests]


def model_requests(ladder: Ladder, vocab_size: int) -> list[dict]:
    """A short request (the first set) and one just past the first set's window (the next set)."""
    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab_size - 1) for _ in range(n)]

    return [{"prompt_token_ids": prompt(32), "max_tokens": 8},
            {"prompt_token_ids": prompt(ladder.sets[0].window + 32), "max_tokens": 4}]


def modes_for(device: str, compare_modes: bool) -> dict[str, dict]:
    """The engine settings of each mode row: compiled and eager; with ``--compare-modes`` also, on CUDA, async
    scheduling off and piecewise graphs alone (the CPU runner has neither), and ngram speculation."""
    if not compare_modes:
        return MODES
    cuda = {"no-async": {"async_scheduling": False}, "piecewise": PIECEWISE} if device == "cuda" else {}
    return {**MODES, **cuda, "ngram": NGRAM}


def check(model_dir: Path, factors: Path, ladder: Ladder, spec: dict, label: str, workdir: Path,
          progress: Progress, parallel: dict, modes: dict[str, dict]) -> list[Row]:
    """Run ``spec`` through the plugin engine in every mode and compare each request with its reference."""
    from rope_ext.selftest.engine_run import run_in_process
    from rope_ext.selftest.reference import ReferenceModel

    outputs = {}
    for mode, settings in modes.items():
        progress(f"{label}: {mode} engine, {len(spec['requests'])} requests")
        run_spec = {**spec, "engine": {**spec["engine"], **parallel, **settings}}
        outputs[mode] = run_in_process(run_spec, {environment.FACTORS: str(factors)}, workdir, f"{label}-{mode}")
    progress(f"{label}: transformers references")
    reference = ReferenceModel(model_dir, ladder, spec["engine"]["max_model_len"])
    references = [reference.run(r["prompt_token_ids"], r["max_tokens"], expected_set(ladder, r))
                  for r in spec["requests"]]
    rows = []
    for mode, out in outputs.items():
        mode_rows = compare_results(label, mode, ladder, spec["requests"], out["results"], references,
                                    out["runner"])
        if "speculative_config" in modes[mode]:
            require_drafts(mode_rows, out["metrics"])
        rows += mode_rows
    return rows


def require_drafts(rows: list[Row], metrics: dict) -> None:
    """A speculation row proves something only if drafts were proposed: then the target model verified several
    tokens of a request in one forward, under that request's set, and the tokens after them came from it."""
    drafted = int(metrics.get("vllm:spec_decode_num_draft_tokens", 0))
    accepted = int(metrics.get("vllm:spec_decode_num_accepted_tokens", 0))
    for row in rows:
        row.note = f"{accepted} of {drafted} draft tokens accepted (the engine's, over every set)"
        if not drafted and row.problem is None:
            row.problem = "the drafter proposed no draft: nothing was verified"


def tiny_check(workdir: Path, progress: Progress, parallel: dict, compare_modes: bool = False) -> list[Row]:
    from rope_ext.models.tiny import build_tiny_model
    from rope_ext.selftest.reference import engine_device
    from rope_ext.selftest.workload import ENGINE, batch_size_waves, engine_spec

    progress("building the tiny three-set model")
    model_dir, factors, ladder = build_tiny_model(workdir, None)
    engine = ENGINE
    spec, _ = engine_spec(str(model_dir), engine, only=TINY_GROUPS)
    device = engine_device()
    rows = check(model_dir, factors, ladder, spec, "tiny", workdir, progress, parallel,
                 modes_for(device, compare_modes))
    if compare_modes and device == "cuda":  # vLLM's defaults (CUDA graphs) over batches padded and not
        sizes = {"batch": [wave for wave in batch_size_waves(CUDA_BATCH_SIZES)]}
        engine = {k: v for k, v in engine.items() if k != "num_gpu_blocks_override"}
        spec, _ = engine_spec(str(model_dir), {**engine, "max_num_seqs": max(CUDA_BATCH_SIZES)}, named_waves=sizes)
        batch_modes = {f"bs{','.join(map(str, CUDA_BATCH_SIZES))}": MODES["compiled"]}
        rows += check(model_dir, factors, ladder, spec, "tiny", workdir, progress, parallel, batch_modes)
    return rows


def model_check(model_dir: Path, workdir: Path, progress: Progress, parallel: dict,
                modes: dict[str, dict] = MODES) -> list[Row]:
    from rope_ext.vllm_plugin.model_ladder import ladder_for_model

    config = json.loads((model_dir / "config.json").read_text())
    ladder = ladder_for_model(config)
    if ladder is None or len(ladder.sets) < 2:
        raise ValueError(f"{model_dir} has no ladder: set {environment.FACTORS} to a factor file, or serve a "
                         "longrope model")
    if environment.factor_file():
        factors = Path(environment.factor_file())
    else:  # the model's own longrope config: written out so the engine reads the same ladder
        factors = workdir / "model-ladder.json"
        save_ladder(ladder, factors)
    engine = {"dtype": "float32", "max_model_len": ladder.sets[-1].window, "max_num_batched_tokens": 2048,
              "enable_prefix_caching": False, "seed": 0, "skip_tokenizer_init": True}
    spec = {"model": str(model_dir), "engine": engine, "requests": model_requests(ladder, config["vocab_size"])}
    return check(model_dir, factors, ladder, spec, model_dir.name, workdir, progress, parallel, modes)


def print_table(rows: list[Row]) -> None:
    print(f"{'model':<16} {'mode':<14} {'runner':<6} {'set':<10} {'requests':>8} {'tokens equal':>13} "
          f"{'max |Δ logprob|':>16} pass")
    for row in rows:
        print(f"{row.model[:16]:<16} {row.mode:<14} {row.runner:<6} {row.set_name[:10]:<10} {row.requests:>8} "
              f"{f'{row.equal}/{row.steps}':>13} {row.max_delta:>16.2e} {'yes' if row.passed else 'NO'}")
    for row in rows:
        if row.problem or row.note:
            print(f"{row.model} {row.mode} {row.set_name}: {row.problem or row.note}")


def selftest(model_dir: Path | None, workdir: Path | None, parallel: dict | None = None,
             compare_modes: bool = False) -> int:
    """Run the checks, print the table; 0 only when every row passes.

    ``parallel``: engine arguments such as tensor_parallel_size, given to every engine.
    ``compare_modes``: the tiny batch under every mode of ``modes_for`` (and CUDA's batch sizes).
    """
    parallel = parallel or {}
    from rope_ext.selftest.reference import LOGPROB_TOLERANCE, engine_device

    progress = Progress()
    with tempfile.TemporaryDirectory(prefix="longrope-selftest-") as tmp:
        work = workdir or Path(tmp)
        for part in ("tiny", "model"):
            (work / part).mkdir(parents=True, exist_ok=True)
        rows = tiny_check(work / "tiny", progress, parallel, compare_modes)
        if model_dir is not None:
            rows += model_check(model_dir, work / "model", progress, parallel)
    setup = ", ".join(f"{k} {v}" for k, v in parallel.items())
    print(f"engine device {engine_device()}{', ' + setup if setup else ''}, float32, "
          f"logprob tolerance {LOGPROB_TOLERANCE:g}; "
          "tokens compared up to each reference's first near-tie")
    print_table(rows)
    ok = all(row.passed for row in rows)
    print("selftest passed" if ok else "selftest FAILED")
    return 0 if ok else 1
