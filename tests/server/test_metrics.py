"""Metrics: a real Prometheus scrapes the live server during short, long and promoted requests."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import time

import openai
import pytest
import yaml

from tests.helpers import REPO, prom_query, prometheus, prometheus_config, samples, scrape, value

pytestmark = pytest.mark.server

DEPLOY = REPO / "deploy"
MODEL = "tiny"


@pytest.fixture(scope="module")
def prometheus_base(tiny_server, tmp_path_factory):
    """A real Prometheus with deploy/prometheus/prometheus.yml, scraping the tiny server."""
    workdir = tmp_path_factory.mktemp("prometheus")
    config = prometheus_config("prometheus.yml", tiny_server.base.removeprefix("http://"), workdir)
    with prometheus(config, workdir) as base:
        yield base




def send_mix(server) -> None:
    """3 short, 2 pinned long, 1 promoted (short -> mid), 1 refused for context length."""
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    rng = random.Random(11)

    def ids(n: int) -> list[int]:
        return [rng.randrange(100, 49000) for _ in range(n)]

    for _ in range(3):  # short: 50 + 8 <= 256
        client.completions.create(model=MODEL, prompt=ids(50), max_tokens=8, temperature=0)
    for _ in range(2):  # pinned long
        client.completions.create(model=MODEL, prompt=ids(60), max_tokens=8, temperature=0,
                                  extra_body={"rope_set": "long"})
    promoted = client.completions.create(model=MODEL, prompt=ids(240), max_tokens=40, temperature=0)
    assert promoted.choices[0].model_extra["rope_promotions"][0]["to"] == "mid"
    with pytest.raises(openai.BadRequestError) as refused:  # no set holds 1100 prompt tokens
        client.completions.create(model=MODEL, prompt=ids(1100), max_tokens=8)
    assert refused.value.body["code"] == "context_length_exceeded"


def test_prometheus_counts_what_was_sent_per_set(tiny_server, prometheus_base):
    before = samples(scrape(tiny_server))
    send_mix(tiny_server)

    expected = [  # (metric, labels, how much it grew)
        ("longrope_requests_finished_total", {"rope_set": "short", "outcome": "length"}, 3),
        ("longrope_requests_finished_total", {"rope_set": "long", "outcome": "length"}, 2),
        ("longrope_requests_finished_total", {"rope_set": "mid", "outcome": "length"}, 1),
        ("longrope_generation_tokens_total", {"rope_set": "short"}, 3 * 8),
        ("longrope_generation_tokens_total", {"rope_set": "long"}, 2 * 8),
        ("longrope_generation_tokens_total", {"rope_set": "mid"}, 40),
        ("longrope_prompt_tokens_total", {"rope_set": "short"}, 3 * 50 + 240),  # the promoted one started short
        ("longrope_prompt_tokens_total", {"rope_set": "long"}, 2 * 60),
        ("longrope_promotions_total", {"from_set": "short", "to_set": "mid"}, 1),
        ("longrope_promotion_reprefill_tokens_total", {"from_set": "short", "to_set": "mid"}, 256),
        ("longrope_promotion_stall_seconds_count", {"from_set": "short", "to_set": "mid"}, 1),
        ("longrope_context_length_refusals_total", {}, 1),
        ("longrope_time_to_first_token_seconds_count", {"rope_set": "short"}, 4),
        ("longrope_e2e_request_latency_seconds_count", {"rope_set": "long"}, 2),
    ]
    want = [value(before, name, model=MODEL, **labels) + grew for name, labels, grew in expected]

    def promql(name: str, labels: dict[str, str]) -> str:
        return name + "{" + ",".join(f'{k}="{v}"' for k, v in {"model": MODEL, **labels}.items()) + "}"

    deadline = time.time() + 30
    while True:  # until Prometheus has scraped the server after the last request
        got = [prom_query(prometheus_base, promql(name, labels)) for name, labels, _ in expected]
        if got == want or time.time() > deadline:
            break
        time.sleep(1)
    assert got == want


def test_vllms_gauges_are_vllms_and_the_http_counter_ours(tiny_server):
    """The engine's gauges are vLLM's own series (the dashboard and the HPA read them); none is repeated."""
    table = samples(scrape(tiny_server))
    names = {name for name, _ in table}
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= names
    assert not {n for n in names if n.startswith("longrope_engine_") or n == "longrope_kv_cache_usage_ratio"}
    assert value(table, "longrope_http_requests_total", route="/v1/completions", method="POST", status="200") > 0


def test_promtool_accepts_exposition_and_configs(tiny_server, tmp_path):
    promtool = shutil.which("promtool")
    assert promtool
    text = scrape(tiny_server)
    ours = "".join(line + "\n" for line in text.splitlines()
                   if line.startswith(("longrope_", "# HELP longrope_", "# TYPE longrope_")))
    check = subprocess.run([promtool, "check", "metrics"], input=ours, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # The whole endpoint parses (exit 3 is lint, 1 a parse error); every lint complaint is about
    # vLLM's own names (colons, a histogram called *_total), which we expose unchanged.
    whole = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    problems = [line for line in (whole.stdout + whole.stderr).splitlines() if line.strip()]
    assert whole.returncode in (0, 3), problems
    assert [p for p in problems if not p.startswith("vllm:")] == []
    for name in ("prometheus.yml", "prometheus-keyed.yml"):  # the keyed one with its key file present
        config = subprocess.run([promtool, "check", "config", str(prometheus_config(name, "x:8000", tmp_path, "k"))],
                                capture_output=True, text=True)
        assert config.returncode == 0, name + ": " + config.stdout + config.stderr


def test_every_dashboard_query_names_live_metrics(tiny_server):
    send_mix(tiny_server)  # labelled series appear once something was counted
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "longrope-serve.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"]]
    live = {name for name, _ in samples(scrape(tiny_server))}
    named = {n for e in exprs for n in re.findall(r"\b(?:longrope_[a-z0-9_]+|vllm:[a-z0-9_:]+)", e)}
    assert named, "no metric names found in the dashboard"
    assert named <= live, named - live


def test_grafana_provisioning_points_at_the_dashboard_folder():
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "longrope.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["uid"] == "prometheus"
