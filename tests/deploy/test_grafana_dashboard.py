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
from promql_check import DASHBOARD, TARGET_LABELS, exported_series, expressions, metric_references, substitute

from conftest import ROOT, require


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_parses_and_is_provisionable(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert (
        datasource["datasources"][0]["uid"]
        == next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")["current"]["value"]
    )


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
    metrics, _ = metric_references(
        'histogram_quantile(0.95, sum by (le) (rate(cxr_inference_batch_size_bucket{colour="x"}[5m])))'
    )
    assert not metrics["cxr_inference_batch_size_bucket"] <= series["cxr_inference_batch_size_bucket"]


def test_dashboard_covers_what_operators_ask_for(dashboard):
    text = "\n".join(expressions(dashboard))
    assert "rate(cxr_gateway_requests_total" in text, "request rate"
    assert 'code!="OK"' in text, "error rate"
    for phi in ("0.5", "0.95", "0.99"):
        assert re.search(
            rf"histogram_quantile\({phi}, sum by \(le, model\) \(rate\(cxr_gateway_request_seconds_bucket", text
        )
        assert re.search(
            rf"histogram_quantile\({phi}, sum by \(le, model\) \(rate\(cxr_inference_queue_duration_seconds_bucket",
            text,
        )
    assert "cxr_inference_batch_size_sum" in text and "cxr_inference_batch_size_count" in text, "batch size"
    assert "cxr_gateway_in_flight_requests" in text and "cxr_inference_pending_requests" in text, "in-flight"


def test_expressions_are_valid_promql(dashboard, tmp_path: Path):
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool not installed (Debian package prometheus)")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"cxr:dashboard_check:{i}", "expr": substitute(e)}
                    for i, e in enumerate(expressions(dashboard))
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # and promtool really parses: a broken expression fails
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "a:b", "expr": "sum by (model (up)"}]}]})
    )
    assert subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, timeout=60).returncode != 0
