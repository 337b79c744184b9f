"""deploy/prometheus: the scrape config and alerting rules are valid for promtool, the alerts name only metrics and
labels our services export, and the alerts fire (and stay quiet) as intended on synthetic series (`promtool test rules`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from promql_check import TARGET_LABELS, exported_series, metric_references

from conftest import ROOT, require

PROMETHEUS = ROOT / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    require(path is not None, "promtool not installed (Debian package prometheus)")
    return path


def test_config_and_rules_are_valid(promtool):
    done = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 rules found" in done.stdout + done.stderr


def alert_rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for rule in group["rules"]
    ]


def test_alerts_name_metrics_and_labels_we_export():
    series = exported_series()
    for rule in alert_rules():
        metrics, grouping = metric_references(rule["expr"])
        available = set(TARGET_LABELS)
        for name, labels in metrics.items():
            assert name in series, f"{rule['alert']}: {name} is not exported by our services"
            assert labels <= series[name] | TARGET_LABELS, f"{rule['alert']}: {name} has no label {labels}"
            available |= series[name]
        assert grouping <= available, f"{rule['alert']}: grouping by {grouping - available}"


def test_alerts_fire_as_intended(promtool, tmp_path: Path):
    """Server-side failures page; bad input from a client does not; a lost upstream pages after a minute."""
    tests = {
        "rule_files": [str(PROMETHEUS / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # ensemble: 10% UNAVAILABLE (our side); mobilenet: 10% INVALID_ARGUMENT (the caller's images)
                    {"series": 'cxr_gateway_requests_total{model="ensemble", code="OK"}', "values": "0+90x20"},
                    {"series": 'cxr_gateway_requests_total{model="ensemble", code="UNAVAILABLE"}', "values": "0+10x20"},
                    {"series": 'cxr_gateway_requests_total{model="mobilenet", code="OK"}', "values": "0+90x20"},
                    {
                        "series": 'cxr_gateway_requests_total{model="mobilenet", code="INVALID_ARGUMENT"}',
                        "values": "0+10x20",
                    },
                    {"series": 'cxr_gateway_upstream_ready{instance="gateway:9090"}', "values": "1 1 1 0 0 0 0 0"},
                    {
                        "series": 'up{job="cxr-inference", instance="inference:8002", profile="default"}',
                        "values": "1x20",
                    },
                    {
                        "series": 'up{job="cxr-inference", instance="inference-gpu:8002", profile="gpu"}',
                        "values": "0x20",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "15m",
                        "alertname": "CxrHighErrorRatio",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "model": "ensemble"},
                                "exp_annotations": {
                                    "summary": "more than 5% of ensemble requests fail on our side (bad input excluded)"
                                },
                            }
                        ],
                    },
                    {"eval_time": "3m", "alertname": "CxrGatewayUpstreamNotReady", "exp_alerts": []},
                    {
                        "eval_time": "5m",
                        "alertname": "CxrGatewayUpstreamNotReady",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "instance": "gateway:9090"},
                                "exp_annotations": {
                                    "summary": "gateway gateway:9090 sees no ready inference service: "
                                    "Classify answers UNAVAILABLE"
                                },
                            }
                        ],
                    },
                    # profiles that are not running (gpu here) are down by design: no page
                    {"eval_time": "10m", "alertname": "CxrTargetDown", "exp_alerts": []},
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
