"""LongRoPE's evolutionary search for rescale factors (Ding et al. 2024, Algorithm 1).

A genome is one factor set's λ per rotary dimension plus n̂. The first population holds the
PI, NTK and YaRN sets and mutants of them; every iteration keeps the best ``parents`` genomes
and adds ``mutations`` mutants and ``crossovers`` children of them. Fitness is a perplexity
(lower is better) computed by a caller-supplied function, so the search itself is pure and
cheap to test; :mod:`rope_ext.research.search_run` wires it to a real model, a disk cache and a log.

Mode ``v2`` follows LongRoPE2 (Shang et al. 2025): dimensions below the critical dimension
(whose period first exceeds W0) are not free, they follow an NTK-style geometric ramp tied to
the critical dimension's λ; the dimensions from it upward are searched in [s, 2s]; n̂ is 0.

The attention scale (mscale) is searched too when the space has scale bounds (LongRoPE2
searches it; the margin of a searched set over NTK comes largely from it). Otherwise every
genome carries the per-set formula (docs/design.md).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Literal

from rope_ext import baselines
from rope_ext.factors import FactorSet, ModelInfo, default_attention_scale

N_HAT_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
GRID = 0.01
SCALE_GRID = 0.001
Mode = Literal["v1", "v2"]


@dataclass(frozen=True)
class Genome:
    """What the search varies: λ on the 0.01 grid (non-decreasing), n̂, and maybe the attention scale."""

    factors: tuple[float, ...]
    n_hat: int = 0
    attention_scale: float | None = None  # None: not searched, the set gets the per-set formula

    @property
    def key(self) -> str:
        """Stable identity for the evaluation cache: the grid values as text.

        A genome without a searched scale keeps the key it had before scales were searched,
        so earlier caches still replay.
        """
        key = f"n{self.n_hat}:" + ",".join(f"{v:.2f}" for v in self.factors)
        return key if self.attention_scale is None else f"{key}:s{self.attention_scale:.3f}"

    def factor_set(self, name: str, window: int, info: ModelInfo) -> FactorSet:
        """The set this genome describes; without a searched scale, the per-set default one."""
        scale = self.attention_scale
        return FactorSet(
            name=name,
            window=window,
            factors=list(self.factors),
            n_hat=self.n_hat,
            attention_scale=default_attention_scale(window, info.original_window) if scale is None else scale,
        )


def critical_dimension(info: ModelInfo) -> int:
    """First frequency index whose period 2π·θ^(2i/d) is longer than W0 (LongRoPE2's d_tcd)."""
    d = info.rotary_dim
    for i in range(d // 2):
        if 2 * math.pi * info.rope_theta ** (2 * i / d) > info.original_window:
            return i
    return d // 2 - 1


@dataclass(frozen=True)
class SearchSpace:
    """Where genomes may lie; :meth:`project` maps any proposal onto a valid genome."""

    dims: int
    lower: float
    upper: float
    mode: Mode = "v1"
    critical: int = 0  # v2 only: the critical dimension index (dimensions below it are tied)
    scale_bounds: tuple[float, float] | None = None  # the attention scale's range; None: not searched

    @classmethod
    def for_model(cls, info: ModelInfo, window: int, mode: Mode = "v1", lower: float | None = None,
                  upper: float | None = None, scale_bounds: tuple[float, float] | None = None) -> SearchSpace:
        scale = max(window / info.original_window, 1.0)
        if mode == "v2":
            return cls(info.rotary_dim // 2, lower or scale, upper or 2 * scale, "v2", critical_dimension(info),
                       scale_bounds)
        return cls(info.rotary_dim // 2, lower or 1.0, upper or 1.25 * scale, "v1", 0, scale_bounds)

    @property
    def bounds(self) -> tuple[float, float]:
        return self.lower, self.upper

    def project(self, factors: Sequence[float], n_hat: int, attention_scale: float | None = None) -> Genome:
        """Round to the grid, clip to the bounds, make λ non-decreasing; v2 ties the low dims.

        In v2 only the dimensions from the critical one up are bounded by [s, 2s]; those below
        follow λ_c^(i/c), a geometric ramp from 1 (NTK's shape) that meets λ_c. The attention
        scale is kept (rounded, clipped) only when the space searches it.
        """
        lo, hi = self.bounds
        free = list(factors)[self.critical :] if self.mode == "v2" else list(factors)
        values, running = [], lo
        for v in free:
            running = max(running, min(max(round(v / GRID) * GRID, lo), hi))
            values.append(round(running, 2))
        if self.mode == "v2":
            tied = values[0]
            values = [round(round(tied ** (i / self.critical) / GRID) * GRID, 2) for i in range(self.critical)] + values
            n_hat = 0
        elif n_hat not in N_HAT_CHOICES:
            n_hat = min(N_HAT_CHOICES, key=lambda c: abs(c - n_hat))
        return Genome(tuple(values), n_hat, self._scale(attention_scale))

    def _scale(self, attention_scale: float | None) -> float | None:
        if self.scale_bounds is None:
            return None
        if attention_scale is None:
            raise ValueError("this space searches the attention scale: give every genome one")
        lo, hi = self.scale_bounds
        return round(min(max(round(attention_scale / SCALE_GRID) * SCALE_GRID, lo), hi), 3)


@dataclass(frozen=True)
class SearchConfig:
    """The paper's settings are the defaults; on a CPU pass smaller ones."""

    population: int = 64
    iterations: int = 40
    parents: int = 32
    mutations: int = 16
    crossovers: int = 16
    mutation_prob: float = 0.3
    mutation_sigma: float = field(default=0.1, metadata={"help": "relative size of a λ mutation step"})
    scale_sigma: float = field(default=0.02, metadata={"help": "relative size of an attention-scale mutation step "
                                                               "(when the scale is searched)"})
    seed: int = 0

    @property
    def evaluations(self) -> int:
        """Upper bound on fitness calls (duplicates are skipped, cached ones are free)."""
        return self.population + self.iterations * (self.mutations + self.crossovers)


@dataclass
class Evaluated:
    genome: Genome
    ppl: float
    origin: str  # "pi" / "ntk" / "yarn" / "plain" / "mutant" / "crossover"
    iteration: int


@dataclass
class SearchResult:
    best: Evaluated
    history: list[Evaluated] = field(default_factory=list)


def seed_genomes(info: ModelInfo, window: int, space: SearchSpace) -> dict[str, Genome]:
    """PI, NTK and YaRN for this window, projected into the search space.

    At or below W0 the three are all plain RoPE (λ = 1), the one seed of a short-set search.
    Where the scale is searched, seeds start from the per-set formula's scale.
    """
    scale = default_attention_scale(window, info.original_window)
    if window <= info.original_window:
        return {"plain": space.project([1.0] * space.dims, 0, scale)}
    seeds: dict[str, Genome] = {}
    for method, make in baselines.METHODS.items():
        fs = make(info, window)
        seeds[method] = space.project(fs.factors, fs.n_hat, scale)
    return seeds


def mutate(genome: Genome, space: SearchSpace, rng: random.Random, prob: float, sigma: float,
           scale_sigma: float = 0.0) -> Genome:
    """Each λ moves with probability ``prob`` by a relative Gaussian step; n̂ moves one choice;
    a searched attention scale moves with the same probability by a step of ``scale_sigma``."""
    factors = [v * math.exp(rng.gauss(0.0, sigma)) if rng.random() < prob else v for v in genome.factors]
    n_hat = genome.n_hat
    if rng.random() < prob:
        i = N_HAT_CHOICES.index(n_hat) + rng.choice((-1, 1))
        n_hat = N_HAT_CHOICES[min(max(i, 0), len(N_HAT_CHOICES) - 1)]
    scale = genome.attention_scale
    if scale is not None and rng.random() < prob:
        scale *= math.exp(rng.gauss(0.0, scale_sigma))
    return space.project(factors, n_hat, scale)


def crossover(a: Genome, b: Genome, space: SearchSpace, rng: random.Random) -> Genome:
    """Each λ, n̂ and attention scale comes from either parent; projection restores the ordering."""
    factors = [x if rng.random() < 0.5 else y for x, y in zip(a.factors, b.factors, strict=True)]
    n_hat = a.n_hat if rng.random() < 0.5 else b.n_hat
    scale = a.attention_scale if rng.random() < 0.5 else b.attention_scale
    return space.project(factors, n_hat, scale)


def _fresh(make: Callable[[], Genome], seen: Container[str], tries: int = 20) -> Genome | None:
    """A proposal not evaluated yet, or None when ``tries`` proposals were all repeats."""
    for _ in range(tries):
        genome = make()
        if genome.key not in seen:
            return genome
    return None


def evolve(
    info: ModelInfo,
    window: int,
    fitness: Callable[[Genome], float],
    space: SearchSpace,
    config: SearchConfig,
    on_evaluated: Callable[[Evaluated], None] = lambda e: None,
) -> SearchResult:
    """Run the search; ``fitness`` returns the perplexity of a genome (lower is better)."""
    rng = random.Random(config.seed)
    seen: dict[str, Evaluated] = {}
    history: list[Evaluated] = []

    def evaluate(genome: Genome, origin: str, iteration: int) -> Evaluated:
        done = Evaluated(genome, fitness(genome), origin, iteration)
        seen[genome.key] = done
        history.append(done)
        on_evaluated(done)
        return done

    def mutant_of(genome: Genome) -> Genome:
        return mutate(genome, space, rng, config.mutation_prob, config.mutation_sigma, config.scale_sigma)

    population: list[Evaluated] = []
    seeds = seed_genomes(info, window, space)
    for origin, genome in seeds.items():
        if genome.key not in seen:
            population.append(evaluate(genome, origin, 0))
    seed_list = list(seeds.values())
    while len(population) < config.population:
        genome = _fresh(lambda: mutant_of(rng.choice(seed_list)), seen)
        if genome is None:
            break
        population.append(evaluate(genome, "mutant", 0))

    for iteration in range(1, config.iterations + 1):
        parents = sorted(population, key=lambda e: e.ppl)[: config.parents]
        children: list[Evaluated] = []
        for _ in range(config.mutations):
            genome = _fresh(lambda: mutant_of(rng.choice(parents).genome), seen)
            if genome is not None:
                children.append(evaluate(genome, "mutant", iteration))
        for _ in range(config.crossovers):
            if len(parents) < 2:
                break
            genome = _fresh(lambda: crossover(*(e.genome for e in rng.sample(parents, 2)), space, rng), seen)
            if genome is not None:
                children.append(evaluate(genome, "crossover", iteration))
        population = parents + children

    best = min(history, key=lambda e: e.ppl)
    return SearchResult(best, history)
