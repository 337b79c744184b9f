"""A model whose config carries none of our `cxr.*` parameters (as a Triton repository made elsewhere would):
the gateway takes the input size from the input tensor's shape and names the classes by index, and still
answers with the model's own probabilities."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.generated.cxr.v1 import gateway_pb2_grpc
from cxr.imaging import load_for_model
from cxr.repository import read_config, write_config
from tests.gateway import processes


def test_model_without_cxr_parameters(trained_repository: Path, dicom_dir: Path, tmp_path: Path, onnx_reference):
    repository = tmp_path / "repository"
    shutil.copytree(trained_repository / "resnet50", repository / "resnet50")
    config = read_config(repository / "resnet50")
    size = int(config.parameters["cxr.image_size"].string_value)
    for key in [k for k in config.parameters if k.startswith("cxr.")]:
        del config.parameters[key]
    write_config(repository / "resnet50", config)
    inference = processes.start_inference(repository, tmp_path / "inference")
    gateway = processes.start_gateway(inference.address, tmp_path / "gateway", extra=["--default-model", "resnet50"])
    try:
        processes.wait_ready(gateway.address)
        channel = grpc.insecure_channel(gateway.address)
        stub = gateway_pb2_grpc.GatewayStub(channel)
        path = dicom_dir / "RG1_J2KI.dcm"
        response = stub.Classify(pb.ClassifyRequest(image=path.read_bytes()), timeout=60)
        assert [c.label for c in response.classes] == ["class_0", "class_1", "class_2"]
        reference = onnx_reference.run("resnet50", response.model_version, load_for_model(path, size))["probabilities"]
        np.testing.assert_allclose([c.probability for c in response.classes], reference, atol=1e-5)
        [info] = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
        assert info.input_size == size and not info.synthetic_demo and info.ready
        channel.close()
    finally:
        gateway.stop()
        inference.stop()
