"""The stock tritonclient[grpc] package, unmodified, drives our inference server (a subprocess on loopback)
serving the models our training exported: the proof that we speak Triton's protocol.

This module must not import cxr.generated.inference, nor cxr.repository which uses it (tritonclient registers the
same protobuf symbols): what it checks against (labels, sha256) it reads from the files directly.
"""

from __future__ import annotations

import hashlib
import json
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from inference.tritonclient_checks.triton_helpers import expect_error, image_input

MODELS = ["custom_cnn", "ensemble", "mobilenet", "resnet50"]
OUTPUTS = ["probabilities", "logits", "cam"]


def read_labels(model_dir):
    return (model_dir / "labels.txt").read_text().split("\n")[:-1]


def sha256_file(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    """tritonclient's own generated stub, for what its high-level client cannot send (typed contents, bad bytes)."""
    with grpc.insecure_channel(server.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_liveness_readiness_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "cxr-inference"
    assert "classification" in metadata.extensions and "model_repository" in metadata.extensions
    for name in MODELS:
        assert client.is_model_ready(name), name
    assert not client.is_model_ready("no_such_model")
    assert client.is_model_ready("custom_cnn", "1") and client.is_model_ready("custom_cnn", "2")
    assert not client.is_model_ready("custom_cnn", "7")


def test_model_metadata_and_config_describe_the_exported_graph(client, served_repository):
    metadata = client.get_model_metadata("custom_cnn")
    assert metadata.platform == "onnxruntime_onnx"
    assert sorted(metadata.versions) == ["1", "2"]
    (image,) = metadata.inputs
    assert (image.name, image.datatype, list(image.shape)) == ("image", "UINT8", [-1, 1, 64, 64])
    outputs = {o.name: (o.datatype, list(o.shape)) for o in metadata.outputs}
    assert outputs == {
        "probabilities": ("FP32", [-1, 3]),
        "logits": ("FP32", [-1, 3]),
        "cam": ("FP32", [-1, 3, 2, 2]),
        "ood_score": ("FP32", [-1, 1]),
    }

    config = client.get_model_config("custom_cnn").config  # decoded with tritonclient's full ModelConfig
    assert config.name == "custom_cnn" and config.max_batch_size == 32
    assert config.version_policy.HasField("all")
    assert config.dynamic_batching.default_queue_policy.max_queue_size > 0
    assert config.parameters["cxr.classes"].string_value.split(",") == read_labels(served_repository / "custom_cnn")
    assert [o.label_filename for o in config.output if o.name == "probabilities"] == ["labels.txt"]


def test_infer_with_raw_contents_on_real_radiographs(client, radiographs, served_repository):
    result = client.infer(
        "mobilenet",
        [image_input(radiographs)],
        request_id="req-17",
        outputs=[triton.InferRequestedOutput(n) for n in OUTPUTS],
    )
    response = result.get_response()
    assert response.id == "req-17"
    assert response.model_name == "mobilenet" and response.model_version == "1"
    assert response.parameters["model_sha256"].string_param == sha256_file(served_repository / "mobilenet/1/model.onnx")
    card = json.loads((served_repository / "mobilenet/1/model_card.json").read_text())
    assert response.parameters["model_sha256"].string_param == card["sha256"]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (6, 3) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert result.as_numpy("logits").shape == (6, 3)
    assert result.as_numpy("cam").shape == (6, 3, 2, 2)
    # each row is its own image's answer: row i equals image i sent alone
    alone = client.infer("mobilenet", [image_input(radiographs[4:5])]).as_numpy("probabilities")
    np.testing.assert_allclose(probabilities[4:5], alone, rtol=1e-4, atol=1e-6)


def test_typed_contents_give_the_same_answer_as_raw_contents(client, stub, radiographs):
    raw = client.infer("custom_cnn", [image_input(radiographs[:2])], model_version="2").as_numpy("probabilities")
    request = service_pb2.ModelInferRequest(model_name="custom_cnn", model_version="2", id="typed")
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=[2, 1, 64, 64])
    tensor.contents.uint_contents.extend(int(v) for v in radiographs[:2].reshape(-1))
    request.outputs.add(name="probabilities")
    response = stub.ModelInfer(request, timeout=30)
    assert response.id == "typed" and response.model_version == "2"
    (out,) = response.outputs
    assert out.name == "probabilities" and list(out.shape) == [2, 3]
    typed = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 3)
    np.testing.assert_allclose(typed, raw, rtol=1e-5, atol=1e-6)


def test_version_selection(client, radiographs):
    newest = client.infer("custom_cnn", [image_input(radiographs)])
    assert newest.get_response().model_version == "2", "empty version means the newest the policy serves"
    v1 = client.infer("custom_cnn", [image_input(radiographs)], model_version="1")
    v2 = client.infer("custom_cnn", [image_input(radiographs)], model_version="2")
    assert v1.get_response().model_version == "1"
    assert v1.get_response().parameters["model_sha256"] != v2.get_response().parameters["model_sha256"]
    assert not np.allclose(v1.as_numpy("logits"), v2.as_numpy("logits")), "v1 and v2 have different weights"
    np.testing.assert_allclose(newest.as_numpy("logits"), v2.as_numpy("logits"), rtol=1e-5, atol=1e-6)


def test_classification_extension(client, radiographs, served_repository):
    labels = read_labels(served_repository / "resnet50")
    result = client.infer(
        "resnet50",
        [image_input(radiographs)],
        outputs=[triton.InferRequestedOutput("probabilities", class_count=2), triton.InferRequestedOutput("logits")],
    )
    top = result.as_numpy("probabilities")
    assert top.shape == (6, 2) and result.as_numpy("logits").shape == (6, 3)
    probabilities = client.infer("resnet50", [image_input(radiographs)]).as_numpy("probabilities")
    for row, entries in enumerate(top):
        parsed = [e.decode().split(":", 2) for e in entries]
        indices = [int(p[1]) for p in parsed]
        assert indices == list(np.argsort(-probabilities[row], kind="stable")[:2])
        for score, index, label in parsed:
            assert label == labels[int(index)]
            assert float(score) == pytest.approx(float(probabilities[row, int(index)]), abs=1e-5)


def test_the_ensemble_is_served_and_averages_its_members(client, radiographs, served_repository):
    card = json.loads((served_repository / "ensemble/1/model_card.json").read_text())
    result = client.infer("ensemble", [image_input(radiographs)])
    ensemble = result.as_numpy("probabilities")
    np.testing.assert_allclose(ensemble.sum(axis=1), 1.0, rtol=1e-5)
    members = [
        client.infer(m, [image_input(radiographs)], model_version="1").as_numpy("probabilities")
        for m in ("custom_cnn", "mobilenet", "resnet50")
    ]
    assert "members" in card
    np.testing.assert_allclose(ensemble, np.mean(members, axis=0), rtol=1e-4, atol=1e-5)


def test_stream_infer_answers_every_request_with_its_id(client, radiographs):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(5):
            client.async_stream_infer("custom_cnn", [image_input(radiographs[i : i + 1])], request_id=f"s{i}")
        client.async_stream_infer(
            "custom_cnn", [image_input(radiographs[:1].astype(np.float32), datatype="FP32")], request_id="bad"
        )
        client.async_stream_infer("custom_cnn", [image_input(radiographs[5:6])], request_id="s5")
        got = [answers.get(timeout=30) for _ in range(7)]
    finally:
        client.stop_stream()
    ok = {r.get_response().id: r for r, e in got if e is None}
    errors = [e for r, e in got if e is not None]
    assert sorted(ok) == [f"s{i}" for i in range(6)]
    assert len(errors) == 1 and "expected datatype UINT8, received FP32" in str(errors[0])
    single = client.infer("custom_cnn", [image_input(radiographs[3:4])]).as_numpy("probabilities")
    np.testing.assert_allclose(ok["s3"].as_numpy("probabilities"), single, rtol=1e-4, atol=1e-6)


def test_statistics_count_what_was_served(client, radiographs):
    before = client.get_inference_statistics("resnet50", "1").model_stats[0]
    for _ in range(3):
        client.infer("resnet50", [image_input(radiographs[:2])])
    after = client.get_inference_statistics("resnet50", "1").model_stats[0]
    assert after.inference_count - before.inference_count == 6
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.execution_count > before.execution_count
    assert after.last_inference > 0
    every = client.get_inference_statistics()
    assert {(s.name, s.version) for s in every.model_stats} >= {("custom_cnn", "1"), ("custom_cnn", "2")}


def test_repository_index_lists_every_model_and_version(client):
    index = client.get_model_repository_index()
    rows = {(m.name, m.version): m.state for m in index.models}
    assert rows == {
        ("custom_cnn", "1"): "READY",
        ("custom_cnn", "2"): "READY",
        ("ensemble", "1"): "READY",
        ("mobilenet", "1"): "READY",
        ("resnet50", "1"): "READY",
    }


# ---- errors: the right status, a message naming expected and received values, and the server stays up ----------


def test_unknown_model_or_version_is_not_found(client, radiographs):
    expect_error(
        "NOT_FOUND",
        lambda: client.infer("no_such_model", [image_input(radiographs[:1])]),
        "no_such_model",
        "custom_cnn",
    )
    expect_error(
        "NOT_FOUND",
        lambda: client.infer("custom_cnn", [image_input(radiographs[:1])], model_version="9"),
        "no version 9",
        "[1, 2]",
    )
    expect_error("NOT_FOUND", lambda: client.get_model_metadata("no_such_model"))
    expect_error("NOT_FOUND", lambda: client.get_model_config("custom_cnn", "9"))


def test_wrong_datatype_shape_and_byte_count_are_invalid_argument(client, stub, radiographs):
    floats = radiographs[:1].astype(np.float32)
    expect_error(
        "INVALID_ARGUMENT",
        lambda: client.infer("custom_cnn", [image_input(floats, datatype="FP32")]),
        "expected datatype UINT8, received FP32",
    )
    small = np.zeros((1, 1, 32, 32), np.uint8)
    expect_error(
        "INVALID_ARGUMENT",
        lambda: client.infer("custom_cnn", [image_input(small)]),
        "expected shape [-1,1,64,64]",
        "received [1,1,32,32]",
    )
    too_many = np.zeros((33, 1, 64, 64), np.uint8)
    expect_error(
        "INVALID_ARGUMENT", lambda: client.infer("custom_cnn", [image_input(too_many)]), "1..32", "received 33"
    )
    expect_error(
        "INVALID_ARGUMENT",
        lambda: client.infer("custom_cnn", [image_input(radiographs[:1], name="img")]),
        "no input 'img'",
        "image",
    )
    expect_error(
        "INVALID_ARGUMENT",
        lambda: client.infer(
            "custom_cnn", [image_input(radiographs[:1])], outputs=[triton.InferRequestedOutput("heatmap")]
        ),
        "no output 'heatmap'",
    )

    request = service_pb2.ModelInferRequest(model_name="custom_cnn")
    request.inputs.add(name="image", datatype="UINT8", shape=[1, 1, 64, 64])
    request.raw_input_contents.append(radiographs[:1].tobytes()[:-100])
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected 4096 bytes" in error.value.details() and "received 3996 bytes" in error.value.details()

    assert client.is_server_ready(), "bad requests must not hurt the server"
    assert client.infer("custom_cnn", [image_input(radiographs[:1])]).as_numpy("probabilities").shape == (1, 3)


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        names = {s.name for s in answer.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_metrics_are_labelled_by_model_and_version(server, client, radiographs):
    client.infer("mobilenet", [image_input(radiographs[:2])])
    with pytest.raises(InferenceServerException):
        client.infer("mobilenet", [image_input(radiographs[:1].astype(np.float32), datatype="FP32")])
    text = server.metrics_text()
    for family in (
        "cxr_inference_request_duration_seconds_bucket",
        "cxr_inference_queue_duration_seconds_bucket",
        "cxr_inference_compute_duration_seconds_bucket",
        "cxr_inference_batch_size_bucket",
    ):
        assert f'{family}{{le="+Inf",model="mobilenet",version="1"}}' in text or any(
            line.startswith(family) and 'model="mobilenet"' in line and 'version="1"' in line
            for line in text.splitlines()
        ), family
    assert _sample(text, 'cxr_inference_request_success_total{model="mobilenet",version="1"}') >= 1
    assert (
        _sample(text, 'cxr_inference_request_failure_total{model="mobilenet",reason="invalid_argument",version="1"}')
        >= 1
    )
    assert 'cxr_inference_pending_requests{model="mobilenet",version="1"} 0.0' in text


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics")


def test_message_size_limit_from_the_environment(served_repository, radiographs, tmp_path):
    """CXR_INFERENCE_MAX_MESSAGE_BYTES bounds what the server accepts: a larger request is refused by gRPC with
    RESOURCE_EXHAUSTED, and the server goes on serving."""
    from inference.server_process import start_server

    limit = 100_000
    server = start_server(
        served_repository,
        tmp_path / "server",
        "--model-control",
        "explicit",
        "--load-model",
        "custom_cnn",
        env={"CXR_INFERENCE_MAX_MESSAGE_BYTES": str(limit)},
    )
    try:
        with triton.InferenceServerClient(server.address) as client:
            big = np.resize(radiographs, (32, 1, 64, 64))  # 131 072 bytes of pixels
            expect_error("RESOURCE_EXHAUSTED", lambda: client.infer("custom_cnn", [image_input(big)]))
            small = client.infer("custom_cnn", [image_input(radiographs)])
            assert small.as_numpy("probabilities").shape == (6, 3)
    finally:
        assert server.stop() == 0
