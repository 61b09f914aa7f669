"""Passkey with a book as the haystack: does a harder retrieval task rank the 16k methods?

At 16k the filler passkey (`bench.quality.run`) puts ours, NTK and YaRN at its ceiling, so it
cannot rank them. This asks the same question with real prose around the key (LongRoPE2's
needle samples: `rope_ext.research.passkey.passkey_sample` with a haystack), the same 10 spread depths
and keys (seed 0) for every method, and reports beside each pass the answer tokens' summed
negative log-likelihood (lower: surer of the key), which still orders methods that all fail.
Run plain RoPE at 8192 as the control: the model inside the window it was trained on.
``--haystack filler`` measures the same likelihood on the filler passkey itself, where every
method that reaches 16k passes: the keys are found, but how surely still differs.

    .venv/bin/python -m bench.quality.book_haystack --length 16384 --methods ladder,ntk,yarn
    .venv/bin/python -m bench.quality.book_haystack --length 8192 --methods plain
    .venv/bin/python -m bench.quality.book_haystack --factors FILE --methods set:long   # another 16k set
    .venv/bin/python -m bench.quality.book_haystack --haystack filler --keys-per-depth 2   # the filler passkey's keys

Each run adds its rows to book_haystack.json (keyed by length, method and haystack), summarises every
cell there (passes, Wilson 95 %, answer NLL median and mean, and on how many keys it is surer than
the `ladder` cell of its length and haystack, with the two-sided sign test's p) and prints that
table; `--methods ""` only re-summarises. The book haystack starts past the tokens the
perplexity rows read (the book's first 32768).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.quality.run import BOOK
from rope_ext.factors import load_ladder
from rope_ext.models.smollm2 import DEFAULT_LADDER
from rope_ext.research.corpus import BOOKS_DIR, book_text
from rope_ext.research.evaluation import load_model, method_sets
from rope_ext.research.passkey import passkey_trial, spread_depths, trial_plan, wilson_interval

OUTPUT = Path(__file__).resolve().parent / "book_haystack.json"


def cell_name(length: int, method: str, haystack: str, factors: Path | None = None) -> str:
    """``16384 ntk``; the filler haystack and a factor file other than the shipped one are named after it."""
    return (f"{length} {method}" + (" filler" if haystack == "filler" else "")
            + ("" if factors in (None, DEFAULT_LADDER) else f" ({factors.name})"))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: how likely a split this uneven is if neither method is surer."""
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def summarise(report: dict[str, Any]) -> None:
    """Each cell's numbers, from its rows; per-key comparisons against ``ladder`` at the same length and haystack."""
    for result in report.values():
        rows, nll = result["rows"], [r["answer_nll"] for r in result["rows"]]
        passed = sum(r["passed"] for r in rows)
        reference = report.get(cell_name(result["length"], "ladder", result["haystack"]))
        result |= {"passed": passed, "trials": len(rows),
                   "wilson95": [round(x, 2) for x in wilson_interval(passed, len(rows))],
                   "median_answer_nll": statistics.median(nll),
                   "mean_answer_nll": statistics.fmean(nll),
                   "keys_surer_than_ladder": None, "keys_compared": None, "sign_test_p": None}
        if reference is not None and reference["rows"] is not rows:  # on the keys both cells measured
            theirs = {(r["depth"], r["key"]): r["answer_nll"] for r in reference["rows"]}
            pairs = [(r["answer_nll"], theirs[r["depth"], r["key"]]) for r in rows if (r["depth"], r["key"]) in theirs]
            surer, less_sure = sum(a < b for a, b in pairs), sum(a > b for a, b in pairs)
            result |= {"keys_surer_than_ladder": surer, "keys_compared": len(pairs),
                       "sign_test_p": float(f"{sign_test(surer, less_sure):.2g}")}


def save(report: dict[str, Any]) -> None:
    """Summarise and write at once: a killed run keeps every finished method."""
    summarise(report)
    OUTPUT.write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--methods", default="ladder,ntk,yarn", help="plain, pi, ntk, yarn, ladder, set:NAME")
    parser.add_argument("--factors", type=Path, default=DEFAULT_LADDER, help="factor file (default: the shipped one)")
    parser.add_argument("--book", default=BOOK, help="a book in data/books (or $LONGROPE_BOOKS_DIR)")
    parser.add_argument("--skip", type=int, default=32768, help="book tokens left out before the haystack")
    parser.add_argument("--haystack", choices=["book", "filler"], default="book",
                        help="the book's prose around the key, or the filler passkey's sentences")
    parser.add_argument("--keys-per-depth", type=int, default=1, help="keys at each of the 10 depths (seed 0)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    args = parser.parse_args()

    ladder = load_ladder(args.factors)
    sets = method_sets(ladder, args.length)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in sets]:
        parser.error(f"unknown methods {unknown}; known at {args.length}: {sorted(sets)}")
    report = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {}
    filler = args.haystack == "filler"
    if methods:
        model, tokenizer = load_model(None, max(args.length, ladder.max_window), dtype=getattr(torch, args.dtype))
        haystack = None if filler else tokenizer(book_text(BOOKS_DIR / args.book),
                                                 add_special_tokens=False)["input_ids"][args.skip:]
    for method in methods:
        model.use(sets[method])
        rows = []
        for depth, key in trial_plan(spread_depths(10), args.keys_per_depth, seed=0):
            start = time.perf_counter()
            trial = passkey_trial(model, tokenizer, args.length, depth, key, haystack=haystack)
            rows.append({"depth": depth, "key": key, "passed": trial.passed, "answer_nll": round(trial.answer_nll, 3),
                         "seconds": round(time.perf_counter() - start, 1)})
            print(f"{args.length} {method:8} depth {depth:.2f}: {rows[-1]}", flush=True)
        report[cell_name(args.length, method, args.haystack, args.factors)] = {
            "length": args.length, "haystack": "filler" if filler else args.book,
            "skip": None if filler else args.skip, "dtype": args.dtype, "rows": rows}
        save(report)
    save(report)  # also brings an older file's summaries up to date
    for cell, r in report.items():
        print(f"{cell:32} {r['passed']}/{r['trials']} {r['wilson95']}  answer nll median {r['median_answer_nll']:.2f}"
              f" mean {r['mean_answer_nll']:.2f}  keys surer than ladder {r['keys_surer_than_ladder']}"
              f" of {r['keys_compared']} (sign test p {r['sign_test_p']})")


if __name__ == "__main__":
    main()
