"""The real stack on loopback: `cxr serve inference` over the trained test repository, and `cxr serve gateway`
in front of it, both as subprocesses. Session-scoped: started once, stopped (SIGTERM) at the end."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from cxr.generated.cxr.v1 import gateway_pb2_grpc
from tests.e2e.limits import GATEWAY_MAX_IMAGE_BYTES, GATEWAY_MAX_PIXELS
from tests.gateway import processes


@pytest.fixture(scope="session")
def inference_service(trained_repository: Path, tmp_path_factory):
    service = processes.start_inference(trained_repository, tmp_path_factory.mktemp("inference"))
    yield service
    service.stop()


@pytest.fixture(scope="session")
def gateway_service(inference_service, trained_repository: Path, tmp_path_factory):
    service = processes.start_gateway(
        inference_service.address,
        tmp_path_factory.mktemp("gateway"),
        extra=[
            "--max-image-bytes",
            str(GATEWAY_MAX_IMAGE_BYTES),
            "--max-image-pixels",
            str(GATEWAY_MAX_PIXELS),
            "--model-repository",
            str(trained_repository),
        ],
    )
    processes.wait_ready(service.address)
    yield service
    assert service.stop() == 0, "the gateway must shut down cleanly on SIGTERM"


@pytest.fixture(scope="session")
def gateway_stub(gateway_service):
    channel = grpc.insecure_channel(
        gateway_service.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    )
    yield gateway_pb2_grpc.GatewayStub(channel)
    channel.close()


class OnnxReference:
    """The same ONNX file the inference service serves, run directly with onnxruntime in this process."""

    def __init__(self, repository: Path):
        self.repository = repository
        self._sessions: dict[tuple[str, str], object] = {}

    def session(self, model: str, version: str):
        key = (model, version)
        if key not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            path = self.repository / model / version / "model.onnx"
            self._sessions[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def run(self, model: str, version: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
        session = self.session(model, version)
        names = [o.name for o in session.get_outputs()]
        outputs = session.run(names, {"image": pixels[None, None].astype(np.uint8)})
        return {name: value[0] for name, value in zip(names, outputs)}


@pytest.fixture(scope="session")
def onnx_reference(trained_repository: Path) -> OnnxReference:
    return OnnxReference(trained_repository)
