"""Quality: perplexity and passkey of the shipped ladder against plain RoPE, PI, NTK, YaRN and the sliding floor.

All on a book the factor search did not see (the search scored moby-dick), one process, the
same scoring forward for every method (float32 unless --dtype):
- perplexity of the book's first 4k / 8k / 16k / 32k tokens, all tokens and positions ≥ W0
  apart: plain, pi, ntk, yarn (static, built for the ladder's longest window), every
  ``set:<name>`` of the factor file, ``ladder`` (the set the server starts such a request in,
  at lengths the ladder holds), and past W0 only ``sliding``: plain RoPE seeing only the last
  W0 tokens (windows of W0 tokens advanced by W0/4, so a scored token sees 3/4·W0 to W0 - 1
  tokens), the floor an extension must beat to be worth its memory;
- passkey at 16k and 32k: plain, pi, ntk, yarn, ladder and sliding (plain RoPE on the prompt's
  last W0 tokens: a key further back is out of its sight); 10 trials per (length, method) cell,
  one key at each depth (i + 0.5) / 10, so keys sit over the whole window; the pass rate
  comes with its Wilson 95 % interval;
- the scoring forward timed against a plain transformers forward (full logits, then
  cross-entropy) on the same 16k tokens, with both perplexities: the search's speed claim.

Every finished measurement is appended to bench/quality/rows.jsonl at once; rerun a killed run
with the same arguments and it skips what that file holds and goes on. The reports
(ppl.json, passkey.json, their PNGs, results.json) are written from it at the end; a sitting in
another dtype or on another book writes its own (passkey-bfloat16.json, ppl-news-from-nowhere.json, ...),
and ``--lengths ""`` skips perplexity.

    .venv/bin/python -m bench.quality.run                     # everything: about 7 hours here
    .venv/bin/python -m bench.quality.run --lengths 4096,8192,16384 --passkey-lengths 16384
    .venv/bin/python -m bench.quality.run --dtype bfloat16 --lengths "" --speed-length 0 --passkey-lengths 32768,16384

Budget on the 2-core development machine, float32: a 16k forward is ~70 s, a 32k one ~4 min;
the passkey cells (one forward per trial) are most of it. bfloat16 is about 3x faster.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import date
from pathlib import Path

import torch

from rope_ext.factors import load_ladder
from rope_ext.models.smollm2 import DEFAULT_LADDER
from rope_ext.research.corpus import BOOKS_DIR
from rope_ext.research.evaluation import (
    SLIDING,
    Measurements,
    load_model,
    passkey_report,
    perplexity_report,
    write_report,
)
from rope_ext.research.hf_model import RotatedModel
from rope_ext.research.passkey import spread_depths
from rope_ext.research.perplexity import documents

HERE = Path(__file__).resolve().parent
ROWS = HERE / "rows.jsonl"
PASSKEY_METHODS = "plain,pi,ntk,yarn,ladder,sliding"
BOOK = "pride-and-prejudice.txt"


def scoring_speed(model: RotatedModel, tokenizer, length: int, data: Path) -> dict:
    """Our scoring forward and a plain transformers forward, one after the other on the same tokens."""
    ids = documents(tokenizer, data, length)[0].ids
    model.use(None)
    timed = {}
    for name, score in (("scoring", model.token_nll), ("plain", model.token_nll_plain_forward)):
        start = time.perf_counter()
        nll = score(ids)
        timed[name] = (time.perf_counter() - start, math.exp(float(nll.mean())))
    (fast_seconds, fast_ppl), (plain_seconds, plain_ppl) = timed["scoring"], timed["plain"]
    return {
        "length": length,
        "plain_forward_tokens_per_s": length / plain_seconds,
        "scoring_forward_tokens_per_s": length / fast_seconds,
        "speed_ratio_scoring_over_plain": plain_seconds / fast_seconds,
        "plain_forward_ppl": plain_ppl,
        "scoring_forward_ppl": fast_ppl,
        "seconds": fast_seconds + plain_seconds,
    }


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _names(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--book", default=BOOK, help="a book in data/books (or $LONGROPE_BOOKS_DIR)")
    parser.add_argument("--factors", type=Path, default=DEFAULT_LADDER, help="factor file (default: the shipped one)")
    parser.add_argument("--lengths", type=_ints, default=[4096, 8192, 16384, 32768])
    parser.add_argument("--methods", type=_names,
                        help="perplexity methods (default: plain,pi,ntk,yarn, every set:<name>, ladder, sliding)")
    parser.add_argument("--passkey-lengths", type=_ints, default=[16384, 32768], help="empty: no passkey")
    parser.add_argument("--passkey-methods", type=_names, default=_names(PASSKEY_METHODS))
    parser.add_argument("--trials", type=int, default=10, help="passkey depths per cell, spread over the window")
    parser.add_argument("--keys-per-depth", type=int, default=1,
                        help="passkey keys at each depth; raising it keeps the trials already measured")
    parser.add_argument("--speed-length", type=int, default=16384, help="tokens of the speed check (0: none)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    data = BOOKS_DIR / args.book
    ladder = load_ladder(args.factors)
    methods = args.methods or ["plain", "pi", "ntk", "yarn", *(f"set:{n}" for n in ladder.names), "ladder", SLIDING]
    started = time.time()
    done = Measurements(ROWS)
    print(f"{len(done.entries)} measurements already in {ROWS}", flush=True)
    model, tokenizer = load_model(None, max(args.lengths + args.passkey_lengths + [args.speed_length]),
                                  args.device, getattr(torch, args.dtype))

    # a bfloat16 sitting, or one on another book, writes its own reports and keeps the float32 ones on the default book
    suffix = (("" if args.dtype == "float32" else f"-{args.dtype}")
              + ("" if args.book == BOOK else f"-{Path(args.book).stem}"))
    if args.lengths:
        ppl = perplexity_report(model, tokenizer, args.factors, data, args.lengths, 1, methods, done)
        write_report(ppl, HERE / f"ppl{suffix}.json", kind="ppl")
    speed = None
    if args.speed_length:
        key = {"measure": "speed", "model": model.info.name, "dtype": str(model.dtype), "data": [args.book],
               "length": args.speed_length}
        speed, _ = done.get_or_measure(key, lambda: scoring_speed(model, tokenizer, args.speed_length, data))
        print(json.dumps(speed, indent=2), flush=True)
    else:  # not measured in this sitting: the latest one of this dtype and book in the rows, so results.json keeps it
        wanted = {"measure": "speed", "dtype": str(model.dtype), "data": [args.book]}
        speed = next((value for key, value in reversed(done.entries.items())
                      if wanted.items() <= json.loads(key).items()), None)
    if args.passkey_lengths:
        passkey = passkey_report(model, tokenizer, args.factors, args.passkey_lengths, spread_depths(args.trials),
                                 args.keys_per_depth, 0, args.passkey_methods, done)
        write_report(passkey, HERE / f"passkey{suffix}.json", kind="passkey")

    results = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "device": args.device,
        "dtype": args.dtype,
        "book": args.book,
        "factors": str(args.factors),
        "minutes_this_sitting": (time.time() - started) / 60,
        "hours_measured_in_rows": sum(v["seconds"] for v in done.entries.values()) / 3600,
        "scoring_speed": speed,
        "rows": ROWS.name,
        "reports": [name for name in (f"ppl{suffix}.json", f"passkey{suffix}.json") if (HERE / name).exists()],
    }
    (HERE / f"results{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {HERE / f'results{suffix}.json'}")


if __name__ == "__main__":
    main()
