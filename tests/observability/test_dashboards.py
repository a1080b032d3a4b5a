"""The Grafana dashboard and the Prometheus rules only use metrics and labels the processes expose.

The metric names come from prometheus_client's registry after importing every process's modules
(the gateway, the bus client and worker, the worker runtime and the three handlers); PromQL is
parsed with a real parser (promql-parser). The rules file is also checked with ``promtool`` when it
is installed, structurally otherwise.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "voice-platform.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"

# Every process's metrics are defined at import time of these modules.
PROCESS_MODULES = (
    "voice_gateway.app",
    "voice_bus.client",
    "voice_bus.worker",
    "voice_runtime.app",
    "voice_runtime.grpc_bridge",
    "voice_stt.handler",
    "voice_llm.handler",
    "voice_tts.handler",
)
# Series Prometheus itself adds to every scrape, and the labels of every target.
SYNTHETIC = {"up": set(), "scrape_duration_seconds": set(), "scrape_samples_scraped": set()}
TARGET_LABELS = {"job", "instance"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}
# What the issue asks the dashboard to show.
REQUIRED_ON_DASHBOARD = {
    "voice_gateway_voice_to_voice_seconds_bucket",
    "voice_gateway_barge_in_latency_seconds_bucket",
    "voice_gateway_active_sessions",
    "voice_stt_latency_seconds_bucket",
    "voice_stt_real_time_factor_bucket",
    "voice_llm_time_to_first_token_seconds_bucket",
    "voice_llm_tokens_per_second_bucket",
    "voice_tts_time_to_first_byte_seconds_bucket",
    "voice_worker_in_flight",
    "voice_worker_consumer_pending",
    "voice_worker_errors_total",
    "voice_gateway_limit_refusals_total",
    "voice_gateway_tool_calls_total",
    "voice_gateway_tool_seconds_bucket",
    "voice_gateway_fallbacks_total",
    "voice_bus_client_resent_total",
}
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


@pytest.fixture(scope="module")
def exposed() -> dict[str, set[str]]:
    """Every series name the processes expose, with the label names each may carry."""
    for module in PROCESS_MODULES:
        importlib.import_module(module)
    names: dict[str, set[str]] = {name: set(labels) for name, labels in SYNTHETIC.items()}
    collectors = getattr(REGISTRY, "_collector_to_names", {})
    for collector in list(collectors):
        labels = set(getattr(collector, "_labelnames", ()))
        describe = getattr(collector, "describe", None)
        for family in (describe() if describe else None) or collector.collect():
            for suffix in SUFFIXES.get(family.type, ("",)):
                names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels)
    assert "voice_worker_consumer_pending" in names, "the process modules registered no metrics"
    return names


def grafana_to_promql(expr: str) -> str:
    """Replaces Grafana's variables so that the expression is plain PromQL."""
    expr = re.sub(r"\[\$\{?__\w+\}?\]", "[5m]", expr)
    return re.sub(r"\$\{?\w+\}?", "x", expr)


def check_expr(expr: str, exposed: dict[str, set[str]]) -> list[str]:
    """Parses ``expr``; returns the problems: unknown metrics, unknown label names."""
    problems: list[str] = []
    try:
        ast = promql_parser.parse(expr)
    except ValueError as exc:
        return [f"does not parse: {exc}"]

    def selectors(node) -> list:
        found = []

        def visit(n):
            if isinstance(n, promql_parser.VectorSelector):
                found.append(n)

        promql_parser.walk(node, visit)
        return found

    def metric_of(selector) -> str:
        if selector.name:
            return selector.name
        return next((m.value for m in selector.matchers.matchers if m.name == "__name__"), "")

    for selector in selectors(ast):
        metric = metric_of(selector)
        if metric not in exposed:
            problems.append(f"unknown metric {metric!r}")
            continue
        allowed = exposed[metric] | TARGET_LABELS | {"__name__"}
        problems += [f"{metric} has no label {m.name!r}" for m in selector.matchers.matchers if m.name not in allowed]

    def aggregations(node):
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            if node.modifier.type == promql_parser.AggModifierType.By:
                inner = [metric_of(s) for s in selectors(node.expr)]
                allowed = set().union(*(exposed.get(m, set()) for m in inner)) | TARGET_LABELS
                problems.extend(
                    f"by ({label}) over {inner}: no such label"
                    for label in node.modifier.labels
                    if label not in allowed
                )

    promql_parser.walk(ast, aggregations)
    return problems


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and query variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            queries += [(sub["title"], t["expr"]) for t in sub.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {variable['name']}: unexpected query {query!r}"
            queries.append((f"${variable['name']}", f"count by ({match[2]}) ({match[1]})"))
    return queries


def test_dashboard_queries_use_exposed_metrics_and_labels(exposed):
    problems = [
        f"{title}: {expr}: {problem}"
        for title, expr in dashboard_queries()
        for problem in check_expr(grafana_to_promql(expr), exposed)
    ]
    assert problems == []


def test_dashboard_shows_what_the_issue_asks_for():
    queries = [grafana_to_promql(expr) for _, expr in dashboard_queries()]
    referenced = set()
    for expr in queries:
        promql_parser.walk(
            promql_parser.parse(expr),
            lambda n: referenced.add(n.name) if isinstance(n, promql_parser.VectorSelector) else None,
        )
    assert REQUIRED_ON_DASHBOARD - referenced == set()
    voice_to_voice = [e for e in queries if "voice_gateway_voice_to_voice_seconds_bucket" in e]
    assert {q for e in voice_to_voice for q in re.findall(r"histogram_quantile\((0\.\d+)", e)} == {
        "0.5",
        "0.95",
        "0.99",
    }


def test_dashboard_structure_and_templated_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" and t["expr"].strip() for t in panel["targets"])


def test_rules_structure_and_expressions(exposed):
    rules_file = yaml.safe_load(RULES.read_text())
    assert set(rules_file) == {"groups"}
    group_names = [g["name"] for g in rules_file["groups"]]
    assert len(group_names) == len(set(group_names))
    alerts = []
    problems = []
    for group in rules_file["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}, group["name"]
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
            name = rule["alert"]
            alerts.append(name)
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", name), name
            assert DURATION.match(str(rule["for"])), f"{name}: for {rule['for']!r}"
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
            assert all(isinstance(v, str) for v in rule["labels"].values()), name
            assert {"summary", "description"} <= set(rule["annotations"]), name
            problems += [f"{name}: {p}" for p in check_expr(rule["expr"], exposed)]
    assert problems == []
    assert len(alerts) == len(set(alerts))
    referenced = " ".join(r["expr"] for g in rules_file["groups"] for r in g["rules"])
    for needed in (
        "voice_gateway_voice_to_voice_seconds_bucket",  # voice-to-voice p95 above target
        "voice_worker_errors_total",  # error rate
        "voice_worker_consumer_pending",  # consumer lag
        "absent(voice_worker_slots",  # no workers of a service
        "voice_worker_in_flight",  # in-flight saturation
        "voice_gateway_limit_refusals_total",  # callers refused by a full gateway, clients over limits
        "voice_gateway_tool_calls_total",  # failing tools
    ):
        assert needed in referenced, needed


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed: structural check only")
def test_rules_pass_promtool():
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
