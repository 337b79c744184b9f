"""A real Prometheus server (Debian's `prometheus`) scrapes the gateway and the inference service; PromQL over its
HTTP API returns exactly the request counts this test sent."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import requests

from conftest import require  # tests/conftest.py
from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.generated.cxr.v1 import gateway_pb2_grpc
from tests.gateway import processes

OK_REQUESTS, BAD_REQUESTS, NOT_FOUND_REQUESTS = 7, 3, 2


def _query(prometheus: str, promql: str) -> float | None:
    answer = requests.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert answer["status"] == "success", answer
    result = answer["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def _wait_for(prometheus: str, promql: str, expected: float, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = _query(prometheus, promql)
        if value == expected:
            return
        time.sleep(0.5)
    pytest.fail(f"{promql} = {value}, expected {expected}")


def _wait_until_ready(server: subprocess.Popen, prometheus: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
        try:
            if requests.get(f"{prometheus}/-/ready", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    pytest.fail(f"prometheus not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def test_prometheus_scrapes_both_services_and_counts_what_we_sent(
    trained_repository: Path, dicom_dir: Path, cxr_raw_dir: Path, tmp_path: Path
):
    binary = shutil.which("prometheus")
    require(binary is not None, "Debian's `prometheus` is needed (apt-get install prometheus)")
    # our own pair of services, so the counters hold this test's requests only
    inference = processes.start_inference(
        trained_repository, tmp_path / "inference", extra=["--model-control", "explicit", "--load-model", "mobilenet"]
    )
    gateway = processes.start_gateway(inference.address, tmp_path / "gateway")
    prometheus_port = processes.free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: cxr-gateway
    static_configs: [{{targets: ["127.0.0.1:{gateway.metrics_port}"]}}]
  - job_name: cxr-inference
    static_configs: [{{targets: ["127.0.0.1:{inference.metrics_port}"]}}]
""")
    log = open(tmp_path / "prometheus.log", "wb")
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prometheus = f"http://127.0.0.1:{prometheus_port}"
    try:
        processes.wait_ready(gateway.address)
        channel = grpc.insecure_channel(gateway.address)
        stub = gateway_pb2_grpc.GatewayStub(channel)
        images = [p.read_bytes() for p in sorted((cxr_raw_dir / "Normal").glob("*.png"))[:OK_REQUESTS]]
        for data in images:
            assert (
                stub.Classify(pb.ClassifyRequest(image=data, model_name="mobilenet"), timeout=60).model_name
                == "mobilenet"
            )
        for data in images[:BAD_REQUESTS]:
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(pb.ClassifyRequest(image=data[:100], model_name="mobilenet"), timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for data in images[:NOT_FOUND_REQUESTS]:
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(pb.ClassifyRequest(image=data, model_name="no_such_model"), timeout=60)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        channel.close()

        _wait_until_ready(server, prometheus, tmp_path / "prometheus.log")
        _wait_for(prometheus, 'sum(up{job=~"cxr-.*"})', 2)
        _wait_for(prometheus, 'sum(cxr_gateway_requests_total{code="OK", model="mobilenet"})', OK_REQUESTS)
        _wait_for(prometheus, 'sum(cxr_gateway_requests_total{code="INVALID_ARGUMENT"})', BAD_REQUESTS)
        _wait_for(prometheus, 'sum(cxr_gateway_requests_total{code="NOT_FOUND"})', NOT_FOUND_REQUESTS)
        _wait_for(prometheus, "sum(cxr_gateway_requests_total)", OK_REQUESTS + BAD_REQUESTS + NOT_FOUND_REQUESTS)
        _wait_for(prometheus, 'sum(cxr_inference_request_success_total{model="mobilenet"})', OK_REQUESTS)
        _wait_for(prometheus, 'sum(cxr_gateway_request_seconds_count{model="mobilenet"})', OK_REQUESTS)
        _wait_for(prometheus, "sum(cxr_gateway_predictions_total)", OK_REQUESTS)
        _wait_for(prometheus, "sum(cxr_gateway_image_errors_total)", BAD_REQUESTS)
        _wait_for(prometheus, "cxr_gateway_upstream_ready", 1)
        _wait_for(prometheus, "cxr_gateway_in_flight_requests", 0)
    finally:
        server.terminate()
        server.wait(15)
        log.close()
        gateway.stop()
        inference.stop()
