"""Prometheus metrics by factor set: the one place that names and records them.

Ours live in their own registry, which :meth:`ServerMetrics.expose` hangs into vLLM's, so
vLLM's own /metrics shows them beside its ``vllm:`` series. `longrope serve` runs one API
process (server/serve.py refuses more), so plain collectors are exact.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, Metric
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.choice_runs import ChoiceRun

# Seconds, from sub-millisecond GPU decode steps to minute-long CPU prefills.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0,
                   300.0)

ENGINE_GAUGES = {  # vLLM's gauge -> ours
    "vllm:num_requests_running": ("longrope_engine_requests_running", "Requests the engine is running."),
    "vllm:num_requests_waiting": ("longrope_engine_requests_waiting", "Requests waiting in the engine's queue."),
    "vllm:kv_cache_usage_perc": ("longrope_kv_cache_usage_ratio", "Fraction of the KV cache in use (0-1)."),
}


class EngineGauges(Collector):
    """Re-reads vLLM's own gauges at scrape time, under our names and labels."""

    def __init__(self, model: str):
        self.model = model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        totals = {name: 0.0 for name in ENGINE_GAUGES}
        for family in REGISTRY.collect():
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
        for source, (name, doc) in ENGINE_GAUGES.items():
            gauge = GaugeMetricFamily(name, doc, labels=["model"])
            gauge.add_metric([self.model], totals[source])
            yield gauge


class _Ours(Collector):
    """Our registry as one collector of vLLM's. ``EngineGauges`` reads vLLM's registry, which then
    holds this collector too: a nested collect yields nothing instead of recursing."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.inside = threading.local()

    def describe(self) -> list[Metric]:
        """Nothing: registering must not collect (that would read vLLM's registry under its own lock)."""
        return []

    def collect(self) -> Iterator[Metric]:
        if getattr(self.inside, "active", False):
            return
        self.inside.active = True
        try:
            yield from self.registry.collect()
        finally:
            self.inside.active = False


class ServerMetrics:
    def __init__(self, model: str):
        self.model = model
        self.registry = CollectorRegistry()
        by_set = ["model", "rope_set"]
        r = self.registry
        self.finished = Counter("longrope_requests_finished", "Finished choices by set and outcome "
                                "(stop, length, aborted, error).", [*by_set, "outcome"], registry=r)
        self.promotions = Counter("longrope_promotions", "Promotions from one set to the next.",
                                  ["model", "from_set", "to_set"], registry=r)
        self.reprefill = Counter("longrope_promotion_reprefill_tokens", "Tokens prefilled again because of "
                                 "promotions.", ["model", "from_set", "to_set"], registry=r)
        self.stall = Histogram("longrope_promotion_stall_seconds", "Gap between the last token before a switch "
                               "and the first after it.", ["model", "from_set", "to_set"], buckets=LATENCY_BUCKETS,
                               registry=r)
        self.cached = Counter("longrope_promotion_cached_tokens", "Tokens of the prefill after a switch found in the "
                              "prefix cache (put there by side prefills).", ["model", "from_set", "to_set"],
                              registry=r)
        self.side_prefills = Counter("longrope_side_prefills", "Side requests that prefilled a promotion's next set "
                                     "before the window (not counted as requests).", by_set, registry=r)
        self.prompt_tokens = Counter("longrope_prompt_tokens", "Prompt tokens by start set.", by_set, registry=r)
        self.generation_tokens = Counter("longrope_generation_tokens", "Generated tokens by final set.", by_set,
                                         registry=r)
        self.ttft = Histogram("longrope_time_to_first_token_seconds", "Time to first token.", by_set,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("longrope_inter_token_latency_seconds", "Time between generated tokens.", by_set,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("longrope_e2e_request_latency_seconds", "Request arrival to last token.", by_set,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("longrope_request_queue_time_seconds", "Time waiting in the engine's queue.", by_set,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.refused = Counter("longrope_context_length_refusals", "Requests refused because no set can hold them.",
                               ["model"], registry=r)
        self.http = Counter("longrope_http_requests", "HTTP requests by route, method and status.",
                            ["route", "method", "status"], registry=r)
        r.register(EngineGauges(model))

    def expose(self, registry: CollectorRegistry) -> None:
        """Show our series on vLLM's /metrics (its registry: ``get_prometheus_registry()``)."""
        registry.register(_Ours(self.registry))

    def choice_done(self, run: ChoiceRun) -> None:
        """Record one finished choice."""
        m = self.model
        self.prompt_tokens.labels(m, run.start_set).inc(run.prompt_tokens)
        self.generation_tokens.labels(m, run.final_set).inc(run.completion_tokens)
        self.finished.labels(m, run.final_set, run.outcome).inc()
        for p in run.promotions:
            self.promotions.labels(m, p.from_set, p.to_set).inc()
            self.reprefill.labels(m, p.from_set, p.to_set).inc(p.at_tokens)
            self.cached.labels(m, p.from_set, p.to_set).inc(p.cached_tokens)
            if p.stall_s is not None:
                self.stall.labels(m, p.from_set, p.to_set).observe(p.stall_s)
        if run.first_token_s is not None:
            self.ttft.labels(m, run.start_set).observe(run.first_token_s)
        for gap in run.token_gaps_s:
            self.itl.labels(m, run.final_set).observe(gap)
        if run.e2e_s is not None:
            self.e2e.labels(m, run.final_set).observe(run.e2e_s)
        for wait in run.queue_s:
            self.queue.labels(m, run.start_set).observe(wait)

    def side_prefill(self, set_name: str) -> None:
        """One side prefill finished (server.side_prefill)."""
        self.side_prefills.labels(self.model, set_name).inc()
