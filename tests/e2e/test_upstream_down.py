"""The inference service goes away and comes back: the gateway answers UNAVAILABLE at once (never hangs until the
deadline), reports NOT_SERVING while it is away, and serves again once it is back."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.generated.cxr.v1 import gateway_pb2_grpc
from tests.gateway import processes

DEADLINE_S = 30.0


def _classify(address: str, data: bytes) -> grpc.StatusCode:
    channel = grpc.insecure_channel(address)
    try:
        gateway_pb2_grpc.GatewayStub(channel).Classify(
            pb.ClassifyRequest(image=data, model_name="custom_cnn"), timeout=DEADLINE_S
        )
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()


def _wait_health(address: str, wanted: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if processes.health_status(address) == wanted:
            return
        time.sleep(0.2)
    pytest.fail(f"gateway health never became {wanted}")


def test_unavailable_quickly_while_down_and_serving_again_after(
    trained_repository: Path, dicom_dir: Path, tmp_path: Path
):
    data = (dicom_dir / "CR-MONO1-10-chest.dcm").read_bytes()
    port = processes.free_port()
    # the Kubernetes form of the target (dns:/// + round_robin over every resolved address)
    gateway = processes.start_gateway(
        f"dns:///localhost:{port}", tmp_path / "gateway", extra=["--request-timeout", str(DEADLINE_S)]
    )
    inference = None
    try:
        # 1. nothing listens upstream: NOT_SERVING, and UNAVAILABLE, not DEADLINE_EXCEEDED after 30 s
        assert processes.health_status(gateway.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        for _ in range(3):
            assert _classify(gateway.address, data) == grpc.StatusCode.UNAVAILABLE
        metrics = requests.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=10).text
        assert 'cxr_gateway_requests_total{code="UNAVAILABLE"' in metrics
        retries = [
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("cxr_gateway_upstream_retries_total ")
        ]
        assert retries and retries[0] >= 3, "UNAVAILABLE is retried (with backoff) before giving up"
        assert "cxr_gateway_upstream_ready 0.0" in metrics
        # 2. the inference service starts on that port: the gateway becomes ready by itself and serves
        inference = processes.start_inference(
            trained_repository,
            tmp_path / "inference",
            port=port,
            extra=["--model-control", "explicit", "--load-model", "custom_cnn"],
        )
        _wait_health(gateway.address, health_pb2.HealthCheckResponse.SERVING)
        assert _classify(gateway.address, data) == grpc.StatusCode.OK
        # 3. it dies without a goodbye: UNAVAILABLE again and NOT_SERVING
        inference.kill()
        assert _classify(gateway.address, data) == grpc.StatusCode.UNAVAILABLE
        _wait_health(gateway.address, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert gateway.alive()
        log = gateway.log_text()
        assert '"code":"UNAVAILABLE"' in log and '"code":"OK"' in log
    finally:
        if inference is not None:
            inference.kill()
        assert gateway.stop() == 0
