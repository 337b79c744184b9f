"""SIGTERM: requests already accepted are answered (drained within the grace period), then the gateway exits 0."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import requests

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.generated.cxr.v1 import gateway_pb2_grpc
from tests.gateway import processes


def _wait_in_flight(gateway: processes.Service, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = requests.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5).text
        line = next(x for x in metrics.splitlines() if x.startswith("cxr_gateway_in_flight_requests "))
        if float(line.split()[-1]) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"never {count} requests in flight")


def test_sigterm_drains_accepted_requests(inference_service, dicom_dir: Path, tmp_path: Path):
    # a grace period no loaded machine runs out of: the point is that accepted requests are answered, not how fast
    gateway = processes.start_gateway(
        inference_service.address, tmp_path, extra=["--decode-workers", "1", "--shutdown-grace", "120"]
    )
    processes.wait_ready(gateway.address)
    data = (dicom_dir / "RG1_J2KI.dcm").read_bytes()  # JPEG 2000, 1955x1841: slow enough to be caught in flight
    channel = grpc.insecure_channel(gateway.address)
    stub = gateway_pb2_grpc.GatewayStub(channel)

    def call(i: int):
        try:
            return stub.Classify(pb.ClassifyRequest(image=data, request_id=f"drain-{i}"), timeout=60).request_id
        except grpc.RpcError as exc:
            return exc.code()

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(call, i) for i in range(4)]
            _wait_in_flight(gateway, 4)  # all four accepted; one thread decodes them one after another
            gateway.process.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert answers == [f"drain-{i}" for i in range(4)]
        assert gateway.process.wait(150) == 0
        log = gateway.log_text()
        assert log.count('"code":"OK"') == 4 and "shutting down" in log
    finally:
        channel.close()
        gateway.kill()
