"""`longrope eval`: perplexity and passkey for a ladder's sets beside the baselines, as JSON and PNG.

Methods compared at a length L (names used in reports and ``--methods``):
- ``plain``: RoPE without scaling (λ = 1, attention scale 1);
- ``pi``, ``ntk``, ``yarn``: each baseline built for the ladder's longest window (or L when
  longer), the way a deployment with one static set runs every request (at that window,
  NTK is what dynamic NTK computes there);
- ``set:<name>``: one set of the factor file, whatever L is;
- ``ladder``: the set the server would start an L-token request in (the regime rule itself);
- ``sliding`` (when asked for, at lengths past W0): the floor, plain RoPE that sees only the
  last W0 tokens (perplexity: :func:`rope_ext.research.perplexity.sliding_perplexity`; passkey: the
  prompt's last W0 tokens, so a key further back is out of its sight).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rope_ext import baselines
from rope_ext.factors import FactorSet, Ladder, load_ladder
from rope_ext.hf_config import model_info
from rope_ext.models.smollm2 import DEFAULT_LADDER, default_model_dir
from rope_ext.research.hf_model import RotatedModel
from rope_ext.research.jsonl_rows import append_row, read_rows
from rope_ext.research.passkey import passkey_trial, trial_plan, wilson_interval
from rope_ext.research.perplexity import Perplexity, book_files, documents, perplexity, sliding_perplexity
from rope_ext.selection import Policy, choose_set

SLIDING = "sliding"


def load_model(model_dir: Path | None, max_positions: int, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[RotatedModel, Any]:
    """The model (float32 unless asked: the precision the references use) and its tokenizer."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir or default_model_dir())
    info = model_info(json.loads((model_dir / "config.json").read_text()), name=model_dir.name)
    model = RotatedModel(model_dir, info, max_positions, dtype)
    model.model.to(device)
    return model, AutoTokenizer.from_pretrained(model_dir)


def method_sets(ladder: Ladder, length: int) -> dict[str, FactorSet]:
    """Every method's set for sequences of ``length`` tokens."""
    info = ladder.model
    window = max(length, ladder.max_window)
    methods: dict[str, FactorSet] = {"plain": baselines.plain_set(info).model_copy(update={"name": "plain"})}
    methods |= {name: make(info, window) for name, make in baselines.METHODS.items()}
    methods |= {f"set:{fs.name}": fs for fs in ladder.sets}
    if length <= ladder.max_window:
        methods["ladder"] = ladder.sets[choose_set(ladder, length - 1, 1, Policy.DYNAMIC)]
    return methods


def _selected(methods: dict[str, FactorSet], wanted: list[str] | None) -> dict[str, FactorSet]:
    return {k: v for k, v in methods.items() if wanted is None or k in wanted}


def _floor_wanted(wanted: list[str] | None, length: int, w0: int) -> bool:
    """The sliding floor runs only when named, and only past W0 (within it, it *is* plain RoPE)."""
    return bool(wanted) and SLIDING in wanted and length > w0


def set_digest(fs: FactorSet) -> str:
    """What a set rotates with, its name left out: a renamed or identical set (``ladder`` and the
    ``set:`` it picks, ``set:short`` and ``plain`` when equal) is the same measurement."""
    return hashlib.sha256(fs.model_dump_json(exclude={"name"}).encode()).hexdigest()[:16]


class Measurements:
    """Finished measurements by key; with a path, also an append-only JSONL that a rerun reads back.

    A quality run on a CPU takes hours (a 32k forward is minutes), so it must survive being
    killed: a rerun looks every measurement up before computing it, as the search's
    ``EvaluationCache`` does for genomes. Keys hold what decides the number (model, dtype,
    tokens, the set's digest), not the method's label. Without a path the store lives in
    memory and still spares one run from measuring a set twice.
    """

    def __init__(self, path: Path | None = None):
        self.path = path
        rows = read_rows(path) if path is not None else ()
        self.entries: dict[str, dict[str, Any]] = {json.dumps(row["key"], sort_keys=True): row["value"] for row in rows}

    def get_or_measure(self, key: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """The stored value for ``key`` (and True), else ``measure()``'s, stored (and False)."""
        text = json.dumps(key, sort_keys=True)
        if text in self.entries:
            return self.entries[text], True
        value = self.entries[text] = measure()
        if self.path is not None:
            append_row(self.path, {"key": key, "value": value})
        return value, False


def _ppl_measurement(score: Callable[[], Perplexity], past_only: bool) -> dict[str, Any]:
    """One perplexity row's numbers; ``past_only``: the method scores no token below W0."""
    start = time.perf_counter()
    result = score()
    return {"ppl": None if past_only else result.all, "ppl_past_w0": result.past_w0, "tokens": result.tokens,
            "seconds": time.perf_counter() - start}


def _passkey_measurement(model: RotatedModel, tokenizer: Any, fs: FactorSet, length: int, depth: float,
                         key: int, context: int | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    model.use(fs)
    return {"passed": passkey_trial(model, tokenizer, length, depth, key, context).passed,
            "seconds": time.perf_counter() - start}


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def perplexity_report(model: RotatedModel, tokenizer: Any, factors: Path | None, data: Path, lengths: list[int],
                      per_book: int, wanted: list[str] | None = None,
                      done: Measurements | None = None) -> dict[str, Any]:
    """Mean perplexity per length and method, all tokens and past W0 apart, with timings.

    ``sliding`` (run only when ``wanted`` names it, at lengths past W0) is the floor: plain
    RoPE whose context is cut to the last W0 tokens, stride W0/4, scored on positions ≥ W0
    alone (its row has no all-token perplexity: it scores no token below W0).
    ``model`` must hold tables for max(lengths) positions (see :func:`load_model`).
    ``done`` keeps finished rows (a rerun skips them); by default they live in memory.
    """
    ladder = load_ladder(factors or DEFAULT_LADDER)
    done = done if done is not None else Measurements()
    w0 = model.info.original_window
    window, stride = w0, w0 // 4
    books = [p.name for p in book_files(data)]
    base = {"measure": "ppl", "model": model.info.name, "dtype": str(model.dtype), "data": books,
            "documents": per_book}
    rows = []
    for length in lengths:
        samples = documents(tokenizer, data, length, per_book)
        jobs = {method: (fs.name, {"set": set_digest(fs)},
                         partial(_ppl_measurement, partial(perplexity, model, fs, samples), False))
                for method, fs in _selected(method_sets(ladder, length), wanted).items()}
        if _floor_wanted(wanted, length, w0):
            floor = partial(sliding_perplexity, model, samples, window, stride)
            jobs[SLIDING] = ("plain", {"sliding": [window, stride]}, partial(_ppl_measurement, floor, True))
        for method, (set_name, what, measure) in jobs.items():
            value, cached = done.get_or_measure(base | {"length": length} | what, measure)
            rows.append({"length": length, "method": method, "set": set_name} | value
                        | ({"window": window, "stride": stride} if method == SLIDING else {}))
            print(f"{length:>6} {method:<14} ppl {_number(value['ppl'])}  past W0 {_number(value['ppl_past_w0'])}"
                  f"  ({value['seconds']:.0f} s{', measured before' if cached else ''})", flush=True)
    return {"model": ladder.model.model_dump(), "factors": str(factors or DEFAULT_LADDER), "data": books,
            "documents_per_book": per_book, "device": str(model.device), "dtype": str(model.dtype),
            "torch_threads": torch.get_num_threads(),
            "results": rows}


def passkey_report(model: RotatedModel, tokenizer: Any, factors: Path | None, lengths: list[int],
                   depths: list[float], trials: int, seed: int, wanted: list[str] | None = None,
                   done: Measurements | None = None) -> dict[str, Any]:
    """Pass rate per length and method, with its Wilson 95 % interval and every trial (depth effects stay visible).

    A cell is one (length, method): ``trials`` keys at each depth, the same keys for every
    cell. ``sliding`` (when ``wanted`` names it, at lengths past W0) is plain RoPE on the
    prompt's last W0 tokens. ``done`` keeps finished trials (a rerun skips them); by default
    they live in memory.
    """
    ladder = load_ladder(factors or DEFAULT_LADDER)
    done = done if done is not None else Measurements()
    plan = trial_plan(depths, trials, seed)
    w0 = model.info.original_window
    base = {"measure": "passkey", "model": model.info.name, "dtype": str(model.dtype)}
    rows = []
    for length in lengths:
        sets = method_sets(ladder, length)
        methods = {method: (fs, None, {}) for method, fs in _selected(sets, wanted).items()}
        if _floor_wanted(wanted, length, w0):
            methods[SLIDING] = (sets["plain"], w0, {"sliding": w0})
        for method, (fs, context, what) in methods.items():
            found = []
            for depth, key in plan:
                value, cached = done.get_or_measure(
                    base | {"length": length, "set": set_digest(fs), "depth": depth, "key": key} | what,
                    partial(_passkey_measurement, model, tokenizer, fs, length, depth, key, context))
                found.append({"depth": depth, "key": key, "passed": value["passed"]})
                if not cached:
                    print(f"{length:>6} {method:<14} depth {depth:.3f} key {key}: "
                          f"{'passed' if value['passed'] else 'failed'} ({value['seconds']:.0f} s)", flush=True)
            passed = sum(t["passed"] for t in found)
            low, high = wilson_interval(passed, len(found))
            rows.append({"length": length, "method": method, "set": fs.name, "accuracy": passed / len(found),
                         "passed": passed, "n": len(found), "interval": [low, high], "trials": found}
                        | ({"context": context} if context else {}))
            print(f"{length:>6} {method:<14} passkey {passed}/{len(found)}, 95 % interval [{low:.2f}, {high:.2f}]",
                  flush=True)
    return {"model": ladder.model.model_dump(), "factors": str(factors or DEFAULT_LADDER), "depths": depths,
            "keys_per_depth": trials, "trials_per_cell": len(plan), "interval": "Wilson score, 95 %", "seed": seed,
            "device": str(model.device), "dtype": str(model.dtype), "results": rows}


def write_report(report: dict[str, Any], output: Path, kind: str) -> None:
    """The JSON report and, beside it, a PNG: one line per method against length.

    Perplexity gets two panels, all tokens and positions ≥ W0 (where the methods differ and
    the sliding-window floor lives); passkey rates carry their 95 % intervals as error bars.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    results = report["results"]
    methods = list(dict.fromkeys(r["method"] for r in results))
    if kind == "ppl":
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        for ax, value, title in zip(axes, ("ppl", "ppl_past_w0"), ("all tokens", "positions ≥ W0"), strict=True):
            for method in methods:
                points = [(r["length"], r[value]) for r in results if r["method"] == method and r[value] is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=method)
            ax.set_yscale("log")
            ax.set_ylabel("perplexity")
            ax.set_title(f"{report['model']['name']}: perplexity, {title}")
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        axes = [ax]
        for i, method in enumerate(methods):
            rows = [r for r in results if r["method"] == method]
            rates = [r["accuracy"] for r in rows]
            errors = [[rate - r["interval"][0] for rate, r in zip(rates, rows, strict=True)],
                      [r["interval"][1] - rate for rate, r in zip(rates, rows, strict=True)]]
            shift = 2 ** (0.04 * (i - (len(methods) - 1) / 2))  # side by side, so no interval hides another
            ax.errorbar([r["length"] * shift for r in rows], rates, yerr=errors, marker="o", capsize=3, label=method)
        ax.set_ylabel("passkey accuracy (Wilson 95 % interval)")
        ax.set_title(f"{report['model']['name']}: passkey retrieval")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.axvline(report["model"]["original_window"], color="grey", linestyle=":", label="W0")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    png = output.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {output} and {png}")
