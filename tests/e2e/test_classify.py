"""Classification through the real gateway and inference service, checked against onnxruntime run directly
on the same pixels (cxr.imaging.load_for_model) with the same ONNX file."""

from __future__ import annotations

import hashlib
import io
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.imaging import load_for_model
from cxr.repository import read_config

MODELS = ("ensemble", "custom_cnn", "mobilenet", "resnet50")
NOT_FOR_CLINICAL_USE = "not for clinical use"


def _image_size(repository: Path, model: str) -> int:
    return int(read_config(repository / model).parameters["cxr.image_size"].string_value)


def _classes(repository: Path, model: str) -> list[str]:
    return read_config(repository / model).parameters["cxr.classes"].string_value.split(",")


def _check_against_onnx(
    response: pb.ClassifyResponse, source: bytes | Path, repository: Path, onnx_reference, tolerance: float = 1e-5
):
    size = _image_size(repository, response.model_name)
    pixels = load_for_model(source, size)
    reference = onnx_reference.run(response.model_name, response.model_version, pixels)
    got = np.array([c.probability for c in response.classes], dtype=np.float32)
    assert [c.label for c in response.classes] == _classes(repository, response.model_name)
    np.testing.assert_allclose(got, reference["probabilities"], atol=tolerance, rtol=0)
    top = int(np.argmax(reference["probabilities"]))
    assert response.top_class == response.classes[top].label
    assert response.top_probability == pytest.approx(float(reference["probabilities"][top]), abs=tolerance)
    return reference


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_shared_dicom_file_matches_onnxruntime(
    gateway_stub, dicom_dir: Path, trained_repository: Path, onnx_reference
):
    files = sorted(dicom_dir.rglob("*.dcm"))
    assert len(files) == 7
    for path in files:
        ids = pb.StudyIdentifiers(
            study_instance_uid="1.2.3.4.5",
            series_instance_uid="1.2.3.4.5.6",
            sop_instance_uid=f"1.2.3.4.5.6.{len(path.name)}",
            accession_number="ACC-0001",
        )
        request_id = uuid.uuid4().hex
        response = gateway_stub.Classify(
            pb.ClassifyRequest(image=path.read_bytes(), request_id=request_id, identifiers=ids), timeout=60
        )
        _check_against_onnx(response, path, trained_repository, onnx_reference)
        assert response.request_id == request_id and response.identifiers == ids
        assert response.model_name == "ensemble" and response.image_format == "dicom"
        assert response.model_sha256 == _sha256(trained_repository / "ensemble" / response.model_version / "model.onnx")
        assert any(n.startswith(NOT_FOR_CLINICAL_USE) for n in response.notices)
        assert ("MONOCHROME1 inverted" in response.notices) == (
            path.name in {"CR-MONO1-10-chest.dcm", "Fake_MONOHR1.dcm", "RG1_J2KI.dcm"}
        )
        t = response.timings
        assert t.decode_ms > 0 and t.preprocess_ms >= 0 and t.inference_ms > 0
        assert t.total_ms >= t.decode_ms + t.inference_ms
        assert abs(sum(c.probability for c in response.classes) - 1.0) < 1e-4


def test_png_and_jpeg_from_cxr_raw_match_onnxruntime(
    gateway_stub, cxr_raw_dir: Path, trained_repository: Path, onnx_reference
):
    for folder in ("Normal", "Lung_Opacity", "Viral Pneumonia"):
        for path in sorted((cxr_raw_dir / folder).glob("*.png"))[:3]:
            response = gateway_stub.Classify(pb.ClassifyRequest(image=path.read_bytes()), timeout=60)
            assert response.image_format == "png"
            _check_against_onnx(response, path, trained_repository, onnx_reference)
            # the same radiograph as JPEG (what some PACS exports send), declared explicitly
            buffer = io.BytesIO()
            Image.open(path).convert("L").save(buffer, format="JPEG", quality=92)
            jpeg = buffer.getvalue()
            response = gateway_stub.Classify(pb.ClassifyRequest(image=jpeg, format=pb.IMAGE_FORMAT_JPEG), timeout=60)
            assert response.image_format == "jpeg"
            _check_against_onnx(response, jpeg, trained_repository, onnx_reference)


@pytest.mark.parametrize("model", MODELS)
def test_each_model_by_name(gateway_stub, dicom_dir: Path, trained_repository: Path, onnx_reference, model: str):
    path = dicom_dir / "derived" / "RG1_derived_MONO2_15bit_RLELossless.dcm"
    response = gateway_stub.Classify(pb.ClassifyRequest(image=path.read_bytes(), model_name=model), timeout=60)
    assert response.model_name == model
    _check_against_onnx(response, path, trained_repository, onnx_reference)


def test_explicit_version_and_newest_version(
    gateway_stub, gateway_service, cxr_raw_dir: Path, trained_repository: Path, onnx_reference
):
    served = [m for m in gateway_stub.ListModels(pb.ListModelsRequest(), timeout=30).models if m.name == "custom_cnn"][
        0
    ]
    assert served.versions, "custom_cnn reports its versions"
    path = sorted((cxr_raw_dir / "Lung_Opacity").glob("*.png"))[0]
    newest = gateway_stub.Classify(pb.ClassifyRequest(image=path.read_bytes(), model_name="custom_cnn"), timeout=60)
    assert newest.model_version == max(served.versions, key=int)
    for version in served.versions:
        response = gateway_stub.Classify(
            pb.ClassifyRequest(image=path.read_bytes(), model_name="custom_cnn", model_version=version), timeout=60
        )
        assert response.model_version == version
        _check_against_onnx(response, path, trained_repository, onnx_reference)


def test_unknown_model_and_version_are_not_found(gateway_stub, dicom_dir: Path):
    data = (dicom_dir / "CR-MONO1-10-chest.dcm").read_bytes()
    for request in (
        pb.ClassifyRequest(image=data, model_name="no_such_model"),
        pb.ClassifyRequest(image=data, model_name="custom_cnn", model_version="999"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            gateway_stub.Classify(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert request.model_name in info.value.details()


def test_heatmap_png_and_raw_map_match_the_cam_output(
    gateway_stub, dicom_dir: Path, trained_repository: Path, onnx_reference
):
    path = dicom_dir / "RG1_J2KI.dcm"
    response = gateway_stub.Classify(
        pb.ClassifyRequest(image=path.read_bytes(), model_name="mobilenet", return_heatmap=True), timeout=60
    )
    reference = _check_against_onnx(response, path, trained_repository, onnx_reference)
    heatmap = response.heatmap
    top = [c.label for c in response.classes].index(response.top_class)
    expected = reference["cam"][top]
    assert heatmap.label == response.top_class
    assert (heatmap.height, heatmap.width) == expected.shape
    np.testing.assert_allclose(np.array(heatmap.values).reshape(expected.shape), expected, atol=1e-4)
    overlay = Image.open(io.BytesIO(heatmap.png))
    assert overlay.format == "PNG" and overlay.mode == "RGB"
    assert max(overlay.size) == 512 and abs(overlay.width / overlay.height - 1841 / 1955) < 0.01
    plain = gateway_stub.Classify(pb.ClassifyRequest(image=path.read_bytes(), model_name="mobilenet"), timeout=60)
    assert not plain.HasField("heatmap")


def test_stream_answers_every_request_in_order_with_errors_in_band(
    gateway_stub, dicom_dir: Path, cxr_raw_dir: Path, trained_repository: Path, onnx_reference
):
    good = [p.read_bytes() for p in sorted(dicom_dir.rglob("*.dcm"))] + [
        p.read_bytes() for p in sorted((cxr_raw_dir / "Normal").glob("*.png"))[:5]
    ]
    items = []
    for i, data in enumerate(good):
        items.append((f"good-{i}", data, None))
        if i % 3 == 0:
            items.append((f"bad-{i}", data[: len(data) // 2], "INVALID_ARGUMENT"))
    items.append(("unknown-model", good[0], "NOT_FOUND"))
    requests = [
        pb.ClassifyRequest(image=data, request_id=rid, model_name="no_such_model" if rid == "unknown-model" else "")
        for rid, data, _ in items
    ]
    answers = list(gateway_stub.ClassifyStream(iter(requests), timeout=120))
    assert [a.request_id for a in answers] == [rid for rid, _, _ in items]
    for (rid, data, expected), answer in zip(items, answers):
        if expected is None:
            assert answer.WhichOneof("result") == "response", (rid, answer.error.message)
            _check_against_onnx(answer.response, data, trained_repository, onnx_reference)
        else:
            assert answer.WhichOneof("result") == "error"
            assert (
                answer.error.code_name == expected and answer.error.code == getattr(grpc.StatusCode, expected).value[0]
            )
            assert answer.error.message


def test_list_models(gateway_stub, trained_repository: Path):
    models = {m.name: m for m in gateway_stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    assert set(models) == set(MODELS)
    for name, info in models.items():
        assert info.ready
        assert list(info.classes) == _classes(trained_repository, name)
        assert info.input_size == _image_size(trained_repository, name)
        assert info.is_default == (name == "ensemble")
        assert info.versions
        # the gateway was given the repository: model card metrics are listed
        assert 0.0 <= info.metrics["accuracy"] <= 1.0
    assert models["custom_cnn"].architecture == "custom_cnn"


def test_health_and_reflection(gateway_service):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(gateway_service.address)
    try:
        for service in ("", "cxr.v1.Gateway"):
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                .status
            )
            assert status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for answer in answers for s in answer.list_services_response.service}
        assert {"cxr.v1.Gateway", "grpc.health.v1.Health"} <= names
    finally:
        channel.close()


def test_cancelled_stream_is_harmless(gateway_stub, gateway_service, dicom_dir: Path):
    data = (dicom_dir / "RG1_J2KI.dcm").read_bytes()  # the slowest file to decode
    call = gateway_stub.ClassifyStream(
        iter([pb.ClassifyRequest(image=data, request_id=f"c{i}") for i in range(20)]), timeout=120
    )
    first = next(call)
    assert first.request_id == "c0"
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert gateway_stub.Classify(pb.ClassifyRequest(image=data), timeout=60).top_class
    assert gateway_service.alive()


def test_deadline_shorter_than_the_work(gateway_stub, dicom_dir: Path):
    data = (dicom_dir / "RG1_J2KI.dcm").read_bytes()
    with pytest.raises(grpc.RpcError) as info:
        gateway_stub.Classify(pb.ClassifyRequest(image=data), timeout=0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert gateway_stub.Classify(pb.ClassifyRequest(image=data), timeout=60).top_class


def test_concurrent_requests_each_get_their_own_answer(
    gateway_stub, cxr_raw_dir: Path, trained_repository: Path, onnx_reference
):
    """Many callers at once (the inference service batches them): every answer belongs to its own request."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [
        p
        for folder in ("Normal", "Lung_Opacity", "Viral Pneumonia")
        for p in sorted((cxr_raw_dir / folder).glob("*.png"))[:8]
    ]
    jobs = [(f"req-{i}", p.read_bytes(), i % 5 == 4) for i, p in enumerate(paths)]  # every 5th is cut short

    def call(job):
        rid, data, bad = job
        try:
            return rid, gateway_stub.Classify(
                pb.ClassifyRequest(image=data[:200] if bad else data, request_id=rid, model_name="custom_cnn"),
                timeout=120,
            )
        except grpc.RpcError as exc:
            return rid, exc.code()

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = dict(pool.map(call, jobs))
    assert len(answers) == len(jobs)
    for rid, data, bad in jobs:
        answer = answers[rid]
        if bad:
            assert answer == grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert answer.request_id == rid
            _check_against_onnx(answer, data, trained_repository, onnx_reference)
