"""Beyond `max_in_flight` requests at once the gateway answers RESOURCE_EXHAUSTED at once instead of queueing
without bound; the requests it accepted are answered normally."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.generated.cxr.v1 import gateway_pb2_grpc
from tests.gateway import processes


def test_requests_beyond_max_in_flight_are_refused(inference_service, dicom_dir: Path, tmp_path: Path):
    gateway = processes.start_gateway(
        inference_service.address, tmp_path, extra=["--decode-workers", "1"], env={"CXR_GATEWAY_MAX_IN_FLIGHT": "1"}
    )
    data = (dicom_dir / "RG1_J2KI.dcm").read_bytes()  # about 0.3 s to decode: the first one is still running
    channel = grpc.insecure_channel(gateway.address)
    stub = gateway_pb2_grpc.GatewayStub(channel)

    def call(_):
        try:
            stub.Classify(pb.ClassifyRequest(image=data), timeout=60)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name + ": " + (exc.details() or "")

    try:
        processes.wait_ready(gateway.address)
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(call, range(6)))
        assert "OK" in answers
        busy = [a for a in answers if a != "OK"]
        assert busy and all(a.startswith("RESOURCE_EXHAUSTED: the gateway is busy") for a in busy), answers
        assert call(0) == "OK"  # and it serves again once idle
    finally:
        channel.close()
        gateway.stop()
