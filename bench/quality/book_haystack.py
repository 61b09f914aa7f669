"""Passkey with a book as the haystack: does a harder retrieval task rank the 16k methods?

At 16k the filler passkey (`bench.quality.run`) puts ours, NTK and YaRN at its ceiling, so it
cannot rank them. This asks the same question with real prose around the key (LongRoPE2's
needle samples: `rope_ext.passkey.passkey_sample` with a haystack), the same 10 spread depths
and keys (seed 0) for every method, and reports beside each pass the answer tokens' summed
negative log-likelihood (lower: surer of the key), which still orders methods that all fail.
Run plain RoPE at 8192 as the control: the model inside the window it was trained on.

    .venv/bin/python -m bench.quality.book_haystack --length 16384 --methods ladder,ntk,yarn
    .venv/bin/python -m bench.quality.book_haystack --length 8192 --methods plain
    .venv/bin/python -m bench.quality.book_haystack --factors FILE --methods set:long   # another 16k set

Each run adds its rows to book_haystack.json (keyed by length and method), summarises every cell
there (passes, Wilson 95 %, answer NLL median and mean, and on how many keys it is surer than
the `ladder` cell of its length) and prints that table; `--methods ""` only re-summarises.
The haystack starts past the tokens the perplexity rows read (the book's first 32768).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from rope_ext.corpus import BOOKS_DIR, book_text
from rope_ext.evaluation import load_model, method_sets
from rope_ext.factors import load_ladder
from rope_ext.model_files import DEFAULT_LADDER
from rope_ext.passkey import passkey_trial, spread_depths, trial_plan, wilson_interval

OUTPUT = Path(__file__).resolve().parent / "book_haystack.json"


def summarise(report: dict[str, Any]) -> None:
    """Each cell's numbers, from its rows; per-key comparisons against ``ladder`` at the same length."""
    for cell, result in report.items():
        rows, nll = result["rows"], [r["answer_nll"] for r in result["rows"]]
        passed = sum(r["passed"] for r in rows)
        reference = report.get(f"{cell.split()[0]} ladder")
        result |= {"passed": passed, "trials": len(rows),
                   "wilson95": [round(x, 2) for x in wilson_interval(passed, len(rows))],
                   "median_answer_nll": statistics.median(nll),
                   "mean_answer_nll": statistics.fmean(nll),
                   "keys_surer_than_ladder": None if reference is None else
                   sum(a < b["answer_nll"] for a, b in zip(nll, reference["rows"], strict=True))}


def save(report: dict[str, Any]) -> None:
    """Summarise and write at once: a killed run keeps every finished method."""
    summarise(report)
    OUTPUT.write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--methods", default="ladder,ntk,yarn", help="plain, pi, ntk, yarn, ladder, set:NAME")
    parser.add_argument("--factors", type=Path, default=DEFAULT_LADDER, help="factor file (default: the shipped one)")
    parser.add_argument("--book", default="pride-and-prejudice.txt", help="a book in ../shared/data/books")
    parser.add_argument("--skip", type=int, default=32768, help="book tokens left out before the haystack")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    args = parser.parse_args()

    ladder = load_ladder(args.factors)
    sets = method_sets(ladder, args.length)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in sets]:
        parser.error(f"unknown methods {unknown}; known at {args.length}: {sorted(sets)}")
    report = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {}
    if methods:
        model, tokenizer = load_model(None, max(args.length, ladder.max_window), dtype=getattr(torch, args.dtype))
        haystack = tokenizer(book_text(BOOKS_DIR / args.book), add_special_tokens=False)["input_ids"][args.skip:]
    for method in methods:
        model.use(sets[method])
        rows = []
        for depth, key in trial_plan(spread_depths(10), 1, seed=0):
            start = time.perf_counter()
            trial = passkey_trial(model, tokenizer, args.length, depth, key, haystack=haystack)
            rows.append({"depth": depth, "key": key, "passed": trial.passed, "answer_nll": round(trial.answer_nll, 3),
                         "seconds": round(time.perf_counter() - start, 1)})
            print(f"{args.length} {method:8} depth {depth:.2f}: {rows[-1]}", flush=True)
        cell = f"{args.length} {method}" + ("" if args.factors == DEFAULT_LADDER else f" ({args.factors.name})")
        report[cell] = {"book": args.book, "skip": args.skip, "dtype": args.dtype, "rows": rows}
        save(report)
    save(report)  # also brings an older file's summaries up to date
    for cell, r in report.items():
        print(f"{cell:32} {r['passed']}/{r['trials']} {r['wilson95']}  answer nll median {r['median_answer_nll']:.2f}"
              f" mean {r['mean_answer_nll']:.2f}  keys surer than ladder {r['keys_surer_than_ladder']}")


if __name__ == "__main__":
    main()
