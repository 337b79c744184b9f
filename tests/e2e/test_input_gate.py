"""The input gate and the indeterminate answer through a real gateway and inference service, over the trained test
repository (64 px, one epoch: its out-of-distribution threshold is weak, so pixel refusals are asserted only for
inputs that are clearly not radiographs; header refusals are exact).

Our own gateway with the default gate (tests/gateway/processes.py turns out_of_distribution into a notice for the
other tests' gateways, so they can send any real radiograph).
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import grpc
import numpy as np
import onnx
import pydicom
import pytest
import requests

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.generated.cxr.v1 import gateway_pb2_grpc
from cxr.imaging import load_for_model
from cxr.repository import read_config, write_config
from services.gateway.input_gate import PAEDIATRIC_NOTICE
from tests.gateway import processes
from training import gate_corpus

NIH = "nih_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"
CLEARLY_OFF = ("rings", "checker8", "checker32", "flat_black", "flat_white", "stripes")  # training/gate_corpus.py
REFUSED = re.compile(r"^image refused \((?P<reason>[a-z_]+)\): .{20,}$")


@pytest.fixture(scope="module")
def strict_gateway(inference_service, tmp_path_factory):
    """A gateway with the default input gate (every reason refuses)."""
    service = processes.start_gateway(
        inference_service.address, tmp_path_factory.mktemp("strict-gateway"), extra=["--gate-as-notice", ""]
    )
    processes.wait_ready(service.address)
    channel = grpc.insecure_channel(service.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    yield service, gateway_pb2_grpc.GatewayStub(channel)
    channel.close()
    service.stop()


def _dicom(dicom_dir: Path, **tags) -> bytes:
    ds = pydicom.dcmread(dicom_dir / NIH)
    for key, value in tags.items():
        setattr(ds, key, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def _refusal(stub, image: bytes, **request) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(pb.ClassifyRequest(image=image, **request), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    match = REFUSED.match(info.value.details())
    assert match, info.value.details()
    return match["reason"]


def _counter(service, name: str, **labels) -> float:
    text = requests.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.split()[-1])
    return 0.0


def test_header_refusals_are_exact_and_counted(strict_gateway, dicom_dir: Path):
    service, stub = strict_gateway
    before = {
        r: _counter(service, "cxr_gateway_image_errors_total", reason=r)
        for r in ("not_radiograph", "not_chest", "lateral_view")
    }
    for name, data in gate_corpus.ct_mr():  # pydicom's own CT, MR and NM slices
        assert _refusal(stub, data) == "not_radiograph", name
    assert _refusal(stub, _dicom(dicom_dir, Modality="MR")) == "not_radiograph"
    assert _refusal(stub, _dicom(dicom_dir, BodyPartExamined="KNEE")) == "not_chest"
    assert _refusal(stub, _dicom(dicom_dir, ViewPosition="LL")) == "lateral_view"
    after = {r: _counter(service, "cxr_gateway_image_errors_total", reason=r) for r in before}
    assert after["not_radiograph"] - before["not_radiograph"] == len(gate_corpus.ct_mr()) + 1
    assert after["not_chest"] - before["not_chest"] == 1 and after["lateral_view"] - before["lateral_view"] == 1
    # a chest radiograph with the same header fields set to chest values is answered
    ok = stub.Classify(
        pb.ClassifyRequest(image=_dicom(dicom_dir, Modality="DX", BodyPartExamined="CHEST", ViewPosition="PA")),
        timeout=60,
    )
    assert ok.top_class and ok.HasField("ood_score")


def test_clearly_off_inputs_are_refused_out_of_distribution(strict_gateway):
    """Flat, periodic and checkered images, with the test ensemble's own fitted threshold (the test models are too
    weak to refuse subtler kinds reliably; the per-kind measurement on trained models is in the README)."""
    _, stub = strict_gateway
    images = [(name, data) for name, data in gate_corpus.gradients() if name in CLEARLY_OFF]
    assert len(images) == len(CLEARLY_OFF)
    reasons = []
    for _, data in images:
        try:
            stub.Classify(pb.ClassifyRequest(image=data), timeout=60)
            reasons.append("answered")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            reasons.append(REFUSED.match(exc.details())["reason"])
    assert reasons == ["out_of_distribution"] * len(images), reasons


def test_stream_items_carry_the_refusal_reason(strict_gateway, dicom_dir: Path):
    _, stub = strict_gateway
    ct = gate_corpus.ct_mr()[0][1]
    requests_ = [
        pb.ClassifyRequest(image=ct, request_id="ct"),
        pb.ClassifyRequest(image=(dicom_dir / NIH).read_bytes(), request_id="cxr"),
    ]
    answers = list(stub.ClassifyStream(iter(requests_), timeout=60))
    assert [a.request_id for a in answers] == ["ct", "cxr"]
    assert answers[0].error.reason == "not_radiograph" and answers[0].error.code_name == "INVALID_ARGUMENT"
    assert answers[0].error.message.startswith("image refused (not_radiograph): ")
    assert answers[1].WhichOneof("result") in (
        "response",
        "error",
    )  # a real radiograph: answered unless out of distribution


def test_response_carries_score_threshold_and_operating_point(
    strict_gateway, trained_repository: Path, onnx_reference, cxr_raw_dir: Path
):
    _, stub = strict_gateway
    for model in ("custom_cnn", "ensemble"):
        config = read_config(trained_repository / model)
        point = float(config.parameters["cxr.operating_point"].string_value)
        answered = 0
        for path in sorted((cxr_raw_dir / "Normal").glob("*.png"))[:6]:
            reference = onnx_reference.run(model, "2" if model == "custom_cnn" else "1", load_for_model(path, 64))
            try:
                r = stub.Classify(pb.ClassifyRequest(image=path.read_bytes(), model_name=model), timeout=60)
            except grpc.RpcError as exc:  # refused only when the graph's own score is above the threshold
                assert "out_of_distribution" in exc.details() and float(reference["ood_score"][0]) > 1.0
                continue
            answered += 1
            assert r.ood_score == pytest.approx(float(reference["ood_score"][0]), rel=1e-4) and r.ood_score <= 1.0
            assert r.ood_threshold == 1.0 and r.operating_point == pytest.approx(point)
            assert r.indeterminate == (r.top_probability < point)
            assert any(n.startswith("indeterminate") for n in r.notices) == r.indeterminate
            assert len(r.classes) == 3 and abs(sum(c.probability for c in r.classes) - 1) < 1e-4  # every probability
        assert answered >= 1


def test_paediatric_notice_from_patient_age(strict_gateway, dicom_dir: Path):
    _, stub = strict_gateway
    child = stub.Classify(pb.ClassifyRequest(image=_dicom(dicom_dir, PatientAge="007Y")), timeout=60)
    adult = stub.Classify(pb.ClassifyRequest(image=_dicom(dicom_dir, PatientAge="045Y")), timeout=60)
    assert PAEDIATRIC_NOTICE in child.notices and PAEDIATRIC_NOTICE not in adult.notices


def test_gate_as_notice_answers_with_a_notice(inference_service, dicom_dir: Path, tmp_path: Path):
    gateway = processes.start_gateway(
        inference_service.address, tmp_path / "gateway", extra=["--gate-as-notice", "all"]
    )
    try:
        processes.wait_ready(gateway.address)
        channel = grpc.insecure_channel(gateway.address)
        stub = gateway_pb2_grpc.GatewayStub(channel)
        r = stub.Classify(pb.ClassifyRequest(image=_dicom(dicom_dir, ViewPosition="LL", Modality="CT")), timeout=60)
        assert any(n.startswith("input gate (not_radiograph)") for n in r.notices)
        assert any(n.startswith("input gate (lateral_view)") for n in r.notices)
        noise = stub.Classify(pb.ClassifyRequest(image=gate_corpus.png(np.full((256, 256), 255, np.uint8))), timeout=60)
        assert noise.ood_score > 1.0 and any(n.startswith("input gate (out_of_distribution)") for n in noise.notices)
        assert _counter(gateway, "cxr_gateway_input_gate_notices_total", reason="lateral_view") == 1
        assert _counter(gateway, "cxr_gateway_image_errors_total", reason="lateral_view") == 0
        channel.close()
    finally:
        gateway.stop()


def test_a_model_without_ood_score_still_serves_with_a_notice(
    trained_repository: Path, dicom_dir: Path, tmp_path: Path
):
    """An older repository: the graph has no ood_score output and the config no threshold or operating point."""
    repository = tmp_path / "repository"
    shutil.copytree(trained_repository / "custom_cnn", repository / "custom_cnn")
    for version in ("1", "2"):
        path = repository / "custom_cnn" / version / "model.onnx"
        model = onnx.load(str(path))
        kept = [o for o in model.graph.output if o.name != "ood_score"]
        del model.graph.output[:]
        model.graph.output.extend(kept)
        onnx.save(model, str(path))
    config = read_config(repository / "custom_cnn")
    del config.output[3]
    for key in ("cxr.ood_threshold", "cxr.operating_point"):
        del config.parameters[key]
    write_config(repository / "custom_cnn", config)
    inference = processes.start_inference(repository, tmp_path / "inference")
    gateway = processes.start_gateway(
        inference.address, tmp_path / "gateway", extra=["--default-model", "custom_cnn", "--gate-as-notice", ""]
    )
    try:
        processes.wait_ready(gateway.address)
        channel = grpc.insecure_channel(gateway.address)
        r = gateway_pb2_grpc.GatewayStub(channel).Classify(
            pb.ClassifyRequest(image=(dicom_dir / NIH).read_bytes()), timeout=60
        )
        assert r.top_class and not r.HasField("ood_score") and not r.HasField("operating_point") and not r.indeterminate
        assert any(n.startswith("no input gate for this model") for n in r.notices)
        channel.close()
    finally:
        gateway.stop()
        inference.stop()
