"""Notices a person must see: a lateral view (from ViewPosition) is refused, and the synthetic-demo warning for models trained
on phantoms (config parameter cxr.synthetic_demo), always alongside "not for clinical use"."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import grpc
import pydicom
import pytest

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.generated.cxr.v1 import gateway_pb2_grpc
from cxr.repository import read_config, write_config
from tests.gateway import processes

NIH = "nih_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"


def _lateral(dicom_dir: Path) -> bytes:
    ds = pydicom.dcmread(dicom_dir / NIH)
    ds.ViewPosition = "LL"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def test_lateral_view_is_refused(gateway_stub, dicom_dir: Path):
    """ViewPosition lateral: refused by the input gate (`--gate-as-notice lateral_view` answers it with a notice,
    tests/e2e/test_input_gate.py)."""
    with pytest.raises(grpc.RpcError) as info:
        gateway_stub.Classify(pb.ClassifyRequest(image=_lateral(dicom_dir)), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("image refused (lateral_view): ViewPosition LL is a lateral view")
    frontal = gateway_stub.Classify(pb.ClassifyRequest(image=(dicom_dir / NIH).read_bytes()), timeout=60)
    assert not any("lateral" in n for n in frontal.notices)
    assert any(n.startswith("not for clinical use") for n in frontal.notices)


def test_synthetic_demo_model_says_so(trained_repository: Path, dicom_dir: Path, tmp_path: Path):
    """The same real model with its config marked `cxr.synthetic_demo: "true"` (as `cxr demo-stack` marks phantom models)."""
    repository = tmp_path / "repository"
    shutil.copytree(trained_repository / "mobilenet", repository / "mobilenet")
    config = read_config(repository / "mobilenet")
    config.parameters["cxr.synthetic_demo"].string_value = "true"
    write_config(repository / "mobilenet", config)
    inference = processes.start_inference(repository, tmp_path / "inference")
    gateway = processes.start_gateway(inference.address, tmp_path / "gateway", extra=["--default-model", "mobilenet"])
    try:
        processes.wait_ready(gateway.address)
        channel = grpc.insecure_channel(gateway.address)
        stub = gateway_pb2_grpc.GatewayStub(channel)
        response = stub.Classify(pb.ClassifyRequest(image=(dicom_dir / NIH).read_bytes()), timeout=60)
        assert response.model_name == "mobilenet"
        assert any(n.startswith("synthetic demo model") for n in response.notices)
        assert any(n.startswith("not for clinical use") for n in response.notices)
        info = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
        assert [(m.name, m.synthetic_demo, m.is_default) for m in info] == [("mobilenet", True, True)]
        channel.close()
    finally:
        gateway.stop()
        inference.stop()
