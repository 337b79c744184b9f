"""PromQL helpers for the deploy tests: which metrics and labels our services export (from their metrics modules),
and which ones a PromQL expression (a Grafana panel, an alert) refers to. A small reader, not a full PromQL parser:
promtool checks the syntax; this checks the names.
"""

from __future__ import annotations

import re

from prometheus_client.metrics import MetricWrapperBase

from conftest import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "cxr-serving.json"
# Labels Prometheus adds to every series from its scrape config (deploy/prometheus/prometheus.yml).
TARGET_LABELS = {"job", "instance", "service", "profile"}
# Grafana's variables, replaced by representative values before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$model": ".*", "${datasource}": "x"}
SAMPLE_SUFFIXES = {
    "counter": ["_total", "_created"],
    "histogram": ["_bucket", "_sum", "_count", "_created"],
    "gauge": [""],
    "summary": ["", "_sum", "_count", "_created"],
}
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


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
        rest = expr[match.end() :].lstrip()
        if (not matchers and rest.startswith("(")) or name.lower() in KEYWORDS:
            continue  # a function or aggregation, or a keyword
        if re.match(r"\d", expr[max(match.start() - 1, 0)]):
            continue  # the exponent or unit of a number
        metrics.setdefault(name, set()).update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers or ""))
    return metrics, grouping


def expressions(dashboard: dict) -> list[str]:
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found += [t["expr"] for t in inner.get("targets", []) if t.get("expr")]
    return found
