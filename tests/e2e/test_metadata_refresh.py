"""Cached model metadata is refreshed: after the model is reloaded with other class names, the gateway answers with
the new names once its cache entry is older than `metadata_ttl_s` (and with the old ones before)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.generated.cxr.v1 import gateway_pb2_grpc
from cxr.generated.inference import grpc_service_pb2, grpc_service_pb2_grpc
from cxr.repository import read_config, write_config
from tests.gateway import processes

TTL_S = 2.0


def _labels(stub, data: bytes) -> list[str]:
    return [c.label for c in stub.Classify(pb.ClassifyRequest(image=data, model_name="mobilenet"), timeout=60).classes]


def test_metadata_refreshes_after_a_reload(trained_repository: Path, dicom_dir: Path, tmp_path: Path):
    repository = tmp_path / "repository"
    shutil.copytree(trained_repository / "mobilenet", repository / "mobilenet")
    inference = processes.start_inference(
        repository, tmp_path / "inference", extra=["--model-control", "explicit", "--load-model", "mobilenet"]
    )
    gateway = processes.start_gateway(
        inference.address, tmp_path / "gateway", env={"CXR_GATEWAY_METADATA_TTL_S": str(TTL_S)}
    )
    data = (dicom_dir / "CR-MONO1-10-chest.dcm").read_bytes()
    try:
        processes.wait_ready(gateway.address)
        gateway_channel = grpc.insecure_channel(gateway.address)
        stub = gateway_pb2_grpc.GatewayStub(gateway_channel)
        before = _labels(stub, data)
        assert before == ["Normal", "Lung_Opacity", "Viral Pneumonia"]
        fetched_at = time.monotonic()

        config = read_config(repository / "mobilenet")
        config.parameters["cxr.classes"].string_value = "Class A,Class B,Class C"
        write_config(repository / "mobilenet", config)
        (repository / "mobilenet" / "labels.txt").write_text("Class A\nClass B\nClass C\n")
        inference_channel = grpc.insecure_channel(inference.address)
        grpc_service_pb2_grpc.GRPCInferenceServiceStub(inference_channel).RepositoryModelLoad(
            grpc_service_pb2.RepositoryModelLoadRequest(model_name="mobilenet"), timeout=120
        )
        inference_channel.close()

        if time.monotonic() - fetched_at < TTL_S * 0.8:
            assert _labels(stub, data) == before  # still cached
        time.sleep(max(0.0, TTL_S - (time.monotonic() - fetched_at)) + 0.2)
        assert _labels(stub, data) == ["Class A", "Class B", "Class C"]
        gateway_channel.close()
    finally:
        gateway.stop()
        inference.stop()
