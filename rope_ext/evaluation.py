"""`longrope eval`: perplexity and passkey for a ladder's sets beside the baselines, as JSON and PNG.

Methods compared at a length L (names used in reports and ``--methods``):
- ``plain``: RoPE without scaling (λ = 1, attention scale 1);
- ``pi``, ``ntk``, ``yarn``: each baseline built for the ladder's longest window (or L when
  longer), the way a deployment with one static set runs every request (at that window,
  NTK is what dynamic NTK computes there);
- ``set:<name>``: one set of the factor file, whatever L is;
- ``ladder``: the set the server would start an L-token request in (the regime rule itself).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from rope_ext import baselines
from rope_ext.factors import FactorSet, Ladder, load_ladder
from rope_ext.hf_config import model_info
from rope_ext.hf_model import RotatedModel
from rope_ext.model_files import DEFAULT_LADDER, default_model_dir
from rope_ext.selection import Policy, choose_set


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


def perplexity_report(model: RotatedModel, tokenizer: Any, factors: Path | None, data: Path, lengths: list[int],
                      per_book: int, wanted: list[str] | None = None) -> dict[str, Any]:
    """Mean perplexity per length and method, all tokens and past W0 apart, with timings.

    ``model`` must hold tables for max(lengths) positions (see :func:`load_model`).
    """
    from rope_ext.perplexity import book_files, documents, perplexity

    ladder = load_ladder(factors or DEFAULT_LADDER)
    rows = []
    for length in lengths:
        samples = documents(tokenizer, data, length, per_book)
        for method, fs in _selected(method_sets(ladder, length), wanted).items():
            start = time.perf_counter()
            result = perplexity(model, fs, samples)
            seconds = time.perf_counter() - start
            rows.append({"length": length, "method": method, "set": fs.name,
                         "ppl": result.all, "ppl_past_w0": result.past_w0, "tokens": result.tokens,
                         "seconds": seconds})
            print(f"{length:>6} {method:<14} ppl {result.all:9.4f}  past W0 "
                  f"{result.past_w0 if result.past_w0 is None else round(result.past_w0, 4)}  ({seconds:.0f} s)",
                  flush=True)
    return {"model": ladder.model.model_dump(), "factors": str(factors or DEFAULT_LADDER),
            "data": [p.name for p in book_files(data)],
            "documents_per_book": per_book, "device": str(model.device), "torch_threads": torch.get_num_threads(),
            "results": rows}


def passkey_report(model: RotatedModel, tokenizer: Any, factors: Path | None, lengths: list[int],
                   depths: list[float], trials: int, seed: int, wanted: list[str] | None = None) -> dict[str, Any]:
    """Accuracy per length and method (and every trial, so depth effects stay visible)."""
    from rope_ext.passkey import passkey_trials

    ladder = load_ladder(factors or DEFAULT_LADDER)
    rows = []
    for length in lengths:
        for method, fs in _selected(method_sets(ladder, length), wanted).items():
            found = passkey_trials(model, tokenizer, fs, [length], depths, trials, seed)
            accuracy = sum(t.passed for t in found) / len(found)
            rows.append({"length": length, "method": method, "set": fs.name, "accuracy": accuracy,
                         "trials": [{"depth": t.depth, "key": t.key, "passed": t.passed} for t in found]})
            print(f"{length:>6} {method:<14} passkey accuracy {accuracy:.2f} ({len(found)} trials)", flush=True)
    return {"model": ladder.model.model_dump(), "factors": str(factors or DEFAULT_LADDER), "depths": depths, "trials_per_cell": trials, "seed": seed,
            "device": str(model.device), "results": rows}


def write_report(report: dict[str, Any], output: Path, kind: str) -> None:
    """The JSON report and, beside it, a PNG: one line per method against length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    value = "ppl" if kind == "ppl" else "accuracy"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    methods = dict.fromkeys(r["method"] for r in report["results"])
    for method in methods:
        points = [(r["length"], r[value]) for r in report["results"] if r["method"] == method]
        ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.set_xscale("log", base=2)
    if kind == "ppl":
        ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("perplexity" if kind == "ppl" else "passkey accuracy")
    ax.set_title(f"{report['model']['name']}: {'perplexity' if kind == 'ppl' else 'passkey retrieval'}")
    ax.axvline(report["model"]["original_window"], color="grey", linestyle=":", label="W0")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    png = output.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {output} and {png}")
