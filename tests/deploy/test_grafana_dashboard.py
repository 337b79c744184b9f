"""The provisioned Grafana dashboard, checked offline: it parses, every PromQL expression is valid PromQL
(promtool), and names only metrics and labels that our services export (read from their metrics modules).
Grafana itself cannot run here (not among Debian's packages, no registry); the compose stack test checks the
same names against what Prometheus scraped from the running services.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from conftest import ROOT, require

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "cxr-serving.json"
# Labels Prometheus adds to every series from its scrape config (deploy/prometheus/prometheus.yml).
TARGET_LABELS = {"job", "instance", "service", "profile"}
# Grafana's variables, replaced by representative values before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$model": ".*", "${datasource}": "x"}
SAMPLE_SUFFIXES = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                   "gauge": [""], "summary": ["", "_sum", "_count", "_created"]}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
            "inf", "nan"}


def exported_series() -> dict[str, set[str]]:
    """Sample name -> label names, for every metric our services define (plus Prometheus's own `up`)."""
    from services.gateway.metrics import GatewayMetrics
    from services.inference.metrics import InferenceMetrics

    series: dict[str, set[str]] = {"up": set()}
    for metrics in (GatewayMetrics(), InferenceMetrics()):
        for metric in vars(metrics).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            for family in metric.describe():
                labels = set(metric._labelnames) | ({"le"} if family.type == "histogram" else set())
                for suffix in SAMPLE_SUFFIXES[family.type]:
                    series[family.name + suffix] = labels - ({"le"} if suffix != "_bucket" else set())
    return series


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def metric_references(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """({metric name: labels in its own matchers}, labels used in by/without/on/ignoring clauses)."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings can hold anything
    grouping: set[str] = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        grouping |= {label.strip() for label in clause.split(",") if label.strip()}
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range and subquery durations
    metrics: dict[str, set[str]] = {}
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*(\{[^}]*\})?", expr):
        name, matchers = match.group(1), match.group(2)
        if not name:
            continue
        rest = expr[match.end():].lstrip()
        if (not matchers and rest.startswith("(")) or name.lower() in KEYWORDS:
            continue  # a function or aggregation, or a keyword
        if re.match(r"\d", expr[max(match.start() - 1, 0)]):
            continue  # the exponent or unit of a number
        metrics.setdefault(name, set()).update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers or ""))
    return metrics, grouping


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def expressions(dashboard: dict) -> list[str]:
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found += [t["expr"] for t in inner.get("targets", []) if t.get("expr")]
    return found


def test_dashboard_parses_and_is_provisionable(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["uid"] == next(
        v for v in dashboard["templating"]["list"] if v["name"] == "datasource")["current"]["value"]


def test_every_expression_names_metrics_and_labels_we_export(dashboard):
    series = exported_series()
    exprs = expressions(dashboard)
    assert len(exprs) >= 10
    for expr in exprs:
        metrics, grouping = metric_references(substitute(expr))
        assert metrics, f"no metric found in {expr!r}"
        available: set[str] = set(TARGET_LABELS)
        for name, labels in metrics.items():
            assert name in series, f"{name!r} (in {expr!r}) is not exported by our services"
            assert labels <= series[name] | TARGET_LABELS, f"{name} has no label {labels - series[name]} ({expr!r})"
            available |= series[name]
        assert grouping <= available, f"grouping by {grouping - available} that no metric in {expr!r} has"


def test_template_variable_query_names_an_exported_label(dashboard):
    series = exported_series()
    [model] = [v for v in dashboard["templating"]["list"] if v["name"] == "model"]
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", model["query"]["query"]).groups()
    assert label in series[metric]


def test_the_checker_catches_unknown_metrics_and_labels():
    series = exported_series()
    metrics, grouping = metric_references('sum by (modle) (rate(cxr_gateway_requestz_total{code!="OK"}[1m])) / 2e3')
    assert metrics == {"cxr_gateway_requestz_total": {"code"}} and grouping == {"modle"}
    assert "cxr_gateway_requestz_total" not in series
    metrics, _ = metric_references('histogram_quantile(0.95, sum by (le) (rate(cxr_inference_batch_size_bucket{colour="x"}[5m])))')
    assert not metrics["cxr_inference_batch_size_bucket"] <= series["cxr_inference_batch_size_bucket"]


def test_dashboard_covers_what_operators_ask_for(dashboard):
    text = "\n".join(expressions(dashboard))
    assert "rate(cxr_gateway_requests_total" in text, "request rate"
    assert 'code!="OK"' in text, "error rate"
    for phi in ("0.5", "0.95", "0.99"):
        assert re.search(rf"histogram_quantile\({phi}, sum by \(le, model\) \(rate\(cxr_gateway_request_seconds_bucket", text)
        assert re.search(rf"histogram_quantile\({phi}, sum by \(le, model\) \(rate\(cxr_inference_queue_duration_seconds_bucket", text)
    assert "cxr_inference_batch_size_sum" in text and "cxr_inference_batch_size_count" in text, "batch size"
    assert "cxr_gateway_in_flight_requests" in text and "cxr_inference_pending_requests" in text, "in-flight"


def test_expressions_are_valid_promql(dashboard, tmp_path: Path):
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool not installed (Debian package prometheus)")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"cxr:dashboard_check:{i}", "expr": substitute(e)} for i, e in enumerate(expressions(dashboard))]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # and promtool really parses: a broken expression fails
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "a:b", "expr": "sum by (model (up)"}]}]}))
    assert subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, timeout=60).returncode != 0
