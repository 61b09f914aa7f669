"""The evolutionary search on its own: the search space's rules, seeding, and that it optimises."""

from __future__ import annotations

import random

import pytest

from rope_ext.baselines import ntk_factors, yarn_factors
from rope_ext.factors import ModelInfo
from rope_ext.research.search import (
    N_HAT_CHOICES,
    Genome,
    SearchConfig,
    SearchSpace,
    critical_dimension,
    crossover,
    evolve,
    mutate,
    seed_genomes,
)

pytestmark = pytest.mark.unit

SMOL = ModelInfo(name="smol", rope_theta=1e5, rotary_dim=64, original_window=8192)


def _valid(genome: Genome, space: SearchSpace) -> bool:
    lo, hi = space.bounds
    on_grid = all(abs(v * 100 - round(v * 100)) < 1e-6 for v in genome.factors)
    ordered = all(a <= b for a, b in zip(genome.factors, genome.factors[1:]))
    return on_grid and ordered and all(lo <= v <= hi for v in genome.factors) and genome.n_hat in N_HAT_CHOICES


def test_projection_rounds_clips_and_orders():
    space = SearchSpace.for_model(SMOL, 16384)
    assert space.bounds == (1.0, 2.5)
    genome = space.project([0.5, 1.234, 1.1, 3.0] + [2.0] * 28, n_hat=5)
    assert genome.factors[:4] == (1.0, 1.23, 1.23, 2.5)
    assert genome.n_hat == 4
    assert _valid(genome, space)


def test_v2_ties_dimensions_below_the_critical_one():
    # period 2π·1e5^(i/32) first exceeds 8192 at i = 20 for SmolLM2.
    assert critical_dimension(SMOL) == 20
    space = SearchSpace.for_model(SMOL, 16384, mode="v2")
    assert space.bounds == (2.0, 4.0)
    genome = space.project([3.0] * 20 + [2.56] + [3.5] * 11, n_hat=16)
    assert genome.n_hat == 0
    assert genome.factors[20] == 2.56 and genome.factors[21:] == (3.5,) * 11
    assert genome.factors[0] == 1.0
    assert genome.factors[10] == pytest.approx(2.56 ** 0.5, abs=0.01)
    assert all(a <= b for a, b in zip(genome.factors, genome.factors[1:]))


def test_seeds_are_the_baselines():
    space = SearchSpace.for_model(SMOL, 16384)
    seeds = seed_genomes(SMOL, 16384, space)
    assert set(seeds) == {"pi", "ntk", "yarn"}
    assert seeds["pi"].factors == (2.0,) * 32
    assert seeds["ntk"].factors == tuple(round(v, 2) for v in ntk_factors(SMOL, 2.0))
    assert seeds["yarn"].factors == tuple(round(v, 2) for v in yarn_factors(SMOL, 2.0))


def test_a_short_set_search_starts_from_plain_rope():
    space = SearchSpace.for_model(SMOL, 8192)
    assert space.bounds == (1.0, 1.25)
    assert seed_genomes(SMOL, 8192, space) == {"plain": Genome((1.0,) * 32, 0)}


def test_mutants_and_children_stay_in_the_space():
    rng = random.Random(1)
    space = SearchSpace.for_model(SMOL, 32768)
    seeds = list(seed_genomes(SMOL, 32768, space).values())
    for _ in range(200):
        child = crossover(mutate(rng.choice(seeds), space, rng, 0.3, 0.2), rng.choice(seeds), space, rng)
        assert _valid(child, space)


def _distance_fitness(target: tuple[float, ...]):
    calls: list[str] = []

    def fitness(genome: Genome) -> float:
        calls.append(genome.key)
        return 10.0 + sum((a - b) ** 2 for a, b in zip(genome.factors, target))

    return fitness, calls


def test_search_improves_on_its_seeds_and_never_repeats_an_evaluation():
    space = SearchSpace.for_model(SMOL, 16384)
    target = tuple(min(1.0 + 0.05 * i, 2.5) for i in range(32))
    fitness, calls = _distance_fitness(target)
    config = SearchConfig(population=16, iterations=8, parents=8, mutations=8, crossovers=8, seed=3)
    result = evolve(SMOL, 16384, fitness, space, config)
    seed_best = min(e.ppl for e in result.history if e.origin in ("pi", "ntk", "yarn"))
    assert result.best.ppl < seed_best
    assert len(calls) == len(set(calls)) == len(result.history) <= config.evaluations
    assert all(_valid(e.genome, space) for e in result.history)


def test_same_seed_same_search():
    space = SearchSpace.for_model(SMOL, 16384)
    target = (1.5,) * 32
    config = SearchConfig(population=8, iterations=3, parents=4, mutations=4, crossovers=4, seed=7)
    runs = [evolve(SMOL, 16384, _distance_fitness(target)[0], space, config) for _ in range(2)]
    assert [e.genome for e in runs[0].history] == [e.genome for e in runs[1].history]
    other = evolve(SMOL, 16384, _distance_fitness(target)[0], space, SearchConfig(**{**config.__dict__, "seed": 8}))
    assert [e.genome for e in other.history] != [e.genome for e in runs[0].history]


def test_cli_defaults_come_from_the_search_config_and_the_baseline_registry():
    """`longrope search` flags are SearchConfig's fields with its defaults; `factors baseline
    --method` offers exactly the baselines registry (one definition each, nothing typed twice)."""
    from dataclasses import asdict

    from longrope.cli import build_parser
    from rope_ext.baselines import METHODS
    from rope_ext.research.search import SearchConfig

    parser = build_parser()
    args = parser.parse_args(["search", "--window", "512", "--data", "x", "-o", "out.json"])
    assert {name: getattr(args, name) for name in asdict(SearchConfig())} == asdict(SearchConfig())
    args = parser.parse_args(["search", "--window", "512", "--data", "x", "-o", "out.json", "--mutation-sigma", "0.2"])
    assert args.mutation_sigma == 0.2
    assert (args.search_scale, args.scale_min, args.scale_max, args.dtype) == (False, 1.0, 1.5, "float32")
    baseline = ["factors", "baseline", "--model", "m", "--window", "9", "-o", "o", "--method"]
    for method in METHODS:
        assert parser.parse_args([*baseline, method]).method == method
    with pytest.raises(SystemExit):
        parser.parse_args([*baseline, "rope-x"])


def test_a_searched_scale_starts_at_the_formula_and_stays_in_its_bounds():
    from rope_ext.factors import default_attention_scale

    space = SearchSpace.for_model(SMOL, 32768, scale_bounds=(1.0, 1.5))
    seeds = seed_genomes(SMOL, 32768, space)
    assert {g.attention_scale for g in seeds.values()} == {round(default_attention_scale(32768, 8192), 3)}
    rng = random.Random(2)
    scales = set()
    for _ in range(300):
        child = crossover(mutate(rng.choice(list(seeds.values())), space, rng, 0.5, 0.2, scale_sigma=0.3),
                          rng.choice(list(seeds.values())), space, rng)
        assert _valid(child, space) and 1.0 <= child.attention_scale <= 1.5
        assert abs(child.attention_scale * 1000 - round(child.attention_scale * 1000)) < 1e-6
        scales.add(child.attention_scale)
    assert len(scales) > 10  # the scale really moves
    with pytest.raises(ValueError, match="attention scale"):
        space.project([1.0] * 32, 0)


def test_a_genome_without_a_searched_scale_keeps_its_old_cache_key():
    """Caches of searches run before the scale was searchable replay unchanged."""
    plain = Genome((1.0, 1.5), 4)
    assert plain.key == "n4:1.00,1.50"
    assert Genome((1.0, 1.5), 4, 1.25).key == "n4:1.00,1.50:s1.250"
    assert Genome((1.0, 1.5), 4, 1.25).factor_set("long", 16384, SMOL).attention_scale == 1.25


def test_the_search_finds_a_known_better_scale():
    """Fitness best at scale 1.3 (the formula gives 1.076 at 2×): the scale search gets near it and
    beats the same search without it, whose sets all carry the formula's scale."""
    target = tuple(min(1.0 + 0.05 * i, 2.5) for i in range(32))

    def fitness(genome: Genome) -> float:
        scale = genome.factor_set("long", 16384, SMOL).attention_scale
        return 10.0 + sum((a - b) ** 2 for a, b in zip(genome.factors, target)) + 20 * (scale - 1.3) ** 2

    config = SearchConfig(population=16, iterations=10, parents=8, mutations=8, crossovers=8, seed=3, scale_sigma=0.05)
    fixed = evolve(SMOL, 16384, fitness, SearchSpace.for_model(SMOL, 16384), config)
    searched = evolve(SMOL, 16384, fitness, SearchSpace.for_model(SMOL, 16384, scale_bounds=(1.0, 1.5)), config)
    assert fixed.best.genome.attention_scale is None
    assert abs(searched.best.genome.attention_scale - 1.3) < 0.1
    assert searched.best.ppl < fixed.best.ppl
