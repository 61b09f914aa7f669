"""The search's fitness forward in bfloat16 against today's float32, at 16k tokens, in one run.

Candidates are genomes the shipped 16k search evaluated (its log), spread evenly over its
ranking from best to worst, scored on the data that search used (the first 16384 tokens of
Moby-Dick after the Gutenberg header). Each candidate is scored by both models in this run,
alternating, and timed. A faster forward is only useful if it keeps the ranking: Spearman's
rank correlation between the two perplexity columns is the number that says so (target ≥ 0.95).

    .venv/bin/python -m bench.fitness_speed.run   # 10 candidates, ≈ 20 min here; writes results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from rope_ext.models.smollm2 import DEFAULT_LADDER
from rope_ext.research.corpus import BOOKS_DIR
from rope_ext.research.evaluation import load_model
from rope_ext.research.perplexity import documents, perplexity
from rope_ext.research.search import Genome

HERE = Path(__file__).resolve().parent
LOG = DEFAULT_LADDER.parent / "search" / "smollm2-long-16384.log.jsonl"
WINDOW = 16384


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            result[k] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks (exact with ties too)."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def candidates(count: int) -> list[dict]:
    """``count`` logged evaluations spread evenly over the log's ranking, best and worst included."""
    logged = sorted((json.loads(line) for line in LOG.read_text().splitlines() if line.strip()), key=lambda e: e["ppl"])
    picks = sorted({round(i * (len(logged) - 1) / (count - 1)) for i in range(count)})
    return [logged[i] for i in picks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()

    models = {name: load_model(None, WINDOW, dtype=dtype) for name, dtype in
              (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    tokenizer = models["float32"][1]
    samples = documents(tokenizer, BOOKS_DIR / "moby-dick.txt", WINDOW)
    info = models["float32"][0].info
    rows = []
    picked = candidates(args.candidates)
    for n, logged in enumerate(tqdm(picked, desc="candidates", unit="cand")):
        fs = Genome(tuple(logged["factors"]), logged["n_hat"]).factor_set("long", WINDOW, info)
        row = {"logged_float32_ppl": logged["ppl"], "origin": logged["origin"]}
        for name in ("float32", "bfloat16") if n % 2 == 0 else ("bfloat16", "float32"):
            start = time.perf_counter()
            row[f"{name}_ppl"] = perplexity(models[name][0], fs, samples).all
            row[f"{name}_s"] = time.perf_counter() - start
        rows.append(row)
        tqdm.write(f"{row['float32_ppl']:.4f} ({row['float32_s']:.0f} s)  bf16 {row['bfloat16_ppl']:.4f} "
                   f"({row['bfloat16_s']:.0f} s)")

    f32, bf16 = [r["float32_ppl"] for r in rows], [r["bfloat16_ppl"] for r in rows]
    close = [i for i, r in enumerate(rows) if r["float32_ppl"] < 40]  # without far-off candidates (PI-like)
    result = {
        "command": f"python -m bench.fitness_speed.run --candidates {args.candidates}",
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "window": WINDOW,
        "data": "moby-dick.txt, first 16384 tokens (the shipped 16k search's fitness data)",
        "speed_ratio_float32_s_over_bfloat16_s": statistics.median(r["float32_s"] for r in rows)
        / statistics.median(r["bfloat16_s"] for r in rows),
        "spearman_all": spearman(f32, bf16),
        "spearman_without_far_seeds": spearman([f32[i] for i in close], [bf16[i] for i in close]),
        "candidates_without_far_seeds": len(close),
        "max_relative_ppl_difference": max(abs(b / a - 1) for a, b in zip(f32, bf16, strict=True)),
        "float32_equals_log": max(abs(r["float32_ppl"] / r["logged_float32_ppl"] - 1) for r in rows),
        "target": "spearman >= 0.95 on at least 8 candidates",
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
