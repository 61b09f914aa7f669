"""Prometheus metrics by factor set: the one place that names them.

Ours live in their own registry, which :meth:`ServerMetrics.expose` hangs into vLLM's, so vLLM's own
/metrics shows them beside its ``vllm:`` series (the engine's running and waiting requests and its KV cache
use are vLLM's own gauges there, not repeated here). `longrope serve` runs one API process (server/serve.py
refuses more), so plain collectors are exact. The latency histograms are observed as the client receives
each output (server.choices, the one observation hook); the counters when a choice ends.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Metric
from prometheus_client.registry import Collector

from server.choices import ChoiceRun

# Seconds, from sub-millisecond GPU decode steps to minute-long CPU prefills.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0,
                   300.0)

class _Ours(Collector):
    """Our registry as one collector of vLLM's, so vLLM's /metrics shows our series beside its own."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def describe(self) -> list[Metric]:
        """Nothing: registering must not collect."""
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()


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
        self.ttft = Histogram("longrope_time_to_first_token_seconds", "Admission to the first output with tokens, "
                              "as the client receives it.", by_set, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("longrope_inter_token_latency_seconds", "Each gap between consecutive outputs of a "
                             "choice as the client receives them (a promotion's switch included).", by_set,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("longrope_e2e_request_latency_seconds", "Request arrival to last token.", by_set,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("longrope_request_queue_time_seconds", "Time waiting in the engine's queue.", by_set,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.refused = Counter("longrope_context_length_refusals", "Requests refused because no set can hold them.",
                               ["model"], registry=r)
        self.http = Counter("longrope_http_requests", "HTTP requests by route, method and status.",
                            ["route", "method", "status"], registry=r)

    def expose(self, registry: CollectorRegistry) -> None:
        """Show our series on vLLM's /metrics (its registry: ``get_prometheus_registry()``)."""
        registry.register(_Ours(self.registry))

    def choice_done(self, run: ChoiceRun, e2e_s: float) -> None:
        """Record one finished choice (``e2e_s``: admission to its end)."""
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
        self.e2e.labels(m, run.final_set).observe(e2e_s)

    def side_prefill(self, set_name: str) -> None:
        """One side prefill finished (server.side_prefill)."""
        self.side_prefills.labels(self.model, set_name).inc()
