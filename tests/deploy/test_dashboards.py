"""The Grafana dashboard and Prometheus alert rules in deploy/: they load, every query parses as PromQL
(promql-parser), and every metric they name is one loom exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import promql_parser
import pytest
import yaml
from prometheus_client import generate_latest

from loom.entrypoints.server.metrics import ServerMetrics
from loom.jobs.metrics import JobsCollector
from loom.jobs.service import JobService

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"\bloom_[a-z0-9_]+")
SEVERITIES = ("info", "warning", "critical")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Names of every sample a loom server's /metrics shows (histograms as _bucket/_sum/_count; labelled
    counters before their first sample included)."""
    metrics = ServerMetrics(lambda: None)
    metrics.registry.register(JobsCollector(JobService(tmp_path_factory.mktemp("state"))))
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
    }
    names = {
        family.name + s for family in metrics.registry.collect() for s in suffixes.get(family.type, ("",))
    }
    text = generate_latest(metrics.registry).decode()
    assert {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] == "l"} <= names
    return names


def promql(expr: str) -> str:
    """The expression with Grafana's variables replaced by values, as Grafana sends it."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


def test_dashboard_loads_and_queries_loom_metrics(exported):
    dashboard = json.loads((DEPLOY / "grafana" / "loom-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids)
    named = set()
    for panel in panels:
        assert {"type", "title", "gridPos", "targets"} <= set(panel), panel.get("title")
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            promql_parser.parse(promql(target["expr"]))
            names = set(METRIC.findall(target["expr"]))
            assert names and names <= exported, (panel["title"], names - exported)
            named |= names
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("first token", "inter-token", "queue", "kv cache", "prefix cache", "batch"):
        assert topic in titles, topic
    assert {"loom_time_to_first_token_seconds_bucket", "loom_batch_requests_pending"} <= named


def test_alert_rules_are_well_formed(exported):
    rules = yaml.safe_load((DEPLOY / "prometheus" / "loom-alerts.yaml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert all(group["name"] and group["rules"] for group in rules["groups"])
    assert len({a["alert"] for a in alerts}) == len(alerts)
    for alert in alerts:
        assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}, alert["alert"]
        promql_parser.parse(alert["expr"])
        assert set(METRIC.findall(alert["expr"])) <= exported, alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES
        assert alert["annotations"]["summary"]
        if "for" in alert:
            assert re.fullmatch(r"\d+[smh]", alert["for"])
