"""`longrope search` end to end: a real model as fitness, a disk cache, a log and a progress bar.

Every evaluation is stored under a key made of the genome and a fingerprint of what it was
scored on (model, tokens, window), so a killed search rerun with the same arguments replays
its finished evaluations from disk at no cost and goes on where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from rope_ext.factors import FORMAT_VERSION, Ladder, ModelInfo
from rope_ext.research.hf_model import RotatedModel
from rope_ext.research.jsonl_rows import append_row, read_rows
from rope_ext.research.perplexity import Sample, perplexity
from rope_ext.research.search import Evaluated, Genome, SearchConfig, SearchResult, SearchSpace, evolve


class EvaluationCache:
    """Append-only JSONL of {context, key, ppl, seconds}; one file can hold many searches."""

    def __init__(self, path: Path, context: str):
        self.path = path
        self.context = context
        self.entries = {row["key"]: row["ppl"] for row in read_rows(path) if row["context"] == context}

    def get(self, genome: Genome) -> float | None:
        return self.entries.get(genome.key)

    def put(self, genome: Genome, ppl: float, seconds: float) -> None:
        self.entries[genome.key] = ppl
        append_row(self.path, {"context": self.context, "key": genome.key, "ppl": ppl, "seconds": seconds})


def fingerprint(info: ModelInfo, window: int, samples: list[Sample], mode: str, dtype: str = "float32") -> str:
    """What a perplexity depends on besides the genome: model, window, scored tokens, mode, dtype.

    float32 adds nothing to the hash, so caches written before the dtype was a choice still replay.
    """
    h = hashlib.sha256(json.dumps([info.model_dump(), window, mode] + ([dtype] if dtype != "float32" else [])).encode())
    for sample in samples:
        h.update(sample.ids.numpy().tobytes())
        if sample.scored is not None:
            h.update(sample.scored.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class SearchRun:
    """Everything a search needs besides the genetic algorithm itself."""

    model: RotatedModel
    samples: list[Sample]
    window: int
    space: SearchSpace
    config: SearchConfig
    cache_path: Path
    log_path: Path
    set_name: str

    def run(self) -> tuple[Ladder, SearchResult]:
        info = self.model.info
        dtype = str(self.model.dtype).removeprefix("torch.")
        cache = EvaluationCache(self.cache_path, fingerprint(info, self.window, self.samples, self.space.mode, dtype))
        bar = tqdm(total=self.config.evaluations, unit="eval", desc=f"search {self.set_name} @ {self.window}")
        best = float("inf")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        last_seconds = 0.0

        def fitness(genome: Genome) -> float:
            nonlocal last_seconds
            cached = cache.get(genome)
            if cached is not None:
                last_seconds = 0.0
                return cached
            start = time.perf_counter()
            ppl = perplexity(self.model, genome.factor_set(self.set_name, self.window, info), self.samples).all
            last_seconds = time.perf_counter() - start
            cache.put(genome, ppl, last_seconds)
            return ppl

        def on_evaluated(done: Evaluated) -> None:
            nonlocal best
            best = min(best, done.ppl)
            record = {"iteration": done.iteration, "origin": done.origin, "ppl": done.ppl, "seconds": last_seconds,
                      "n_hat": done.genome.n_hat, "factors": list(done.genome.factors)}
            if done.genome.attention_scale is not None:
                record["attention_scale"] = done.genome.attention_scale
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(best_ppl=f"{best:.3f}", iteration=done.iteration)
            bar.update(1)

        try:
            result = evolve(info, self.window, fitness, self.space, self.config, on_evaluated)
        finally:
            bar.close()
            log.close()
        best_set = result.best.genome.factor_set(self.set_name, self.window, info)
        return Ladder(format_version=FORMAT_VERSION, model=info, sets=[best_set]), result


def search_summary(result: SearchResult, config: SearchConfig, space: SearchSpace) -> dict:
    """The numbers worth keeping beside the factor file."""
    seeds = {e.origin: e.ppl for e in result.history if e.iteration == 0 and e.origin != "mutant"}
    return {
        "config": asdict(config),
        "space": {"mode": space.mode, "bounds": list(space.bounds), "critical": space.critical,
                  "scale_bounds": list(space.scale_bounds) if space.scale_bounds else None},
        "evaluations": len(result.history),
        "seed_ppl": seeds,
        "best": {"ppl": result.best.ppl, "origin": result.best.origin, "iteration": result.best.iteration,
                 "n_hat": result.best.genome.n_hat, "factors": list(result.best.genome.factors),
                 "attention_scale": result.best.genome.attention_scale},
    }
