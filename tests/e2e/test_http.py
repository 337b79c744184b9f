"""HTTP beside gRPC on the real stack: the gateway's JSON API answers what its gRPC API answers, and both
services' HTTP status codes, checked with a plain HTTP client (requests).

The HTTP adapters call the same servicers as gRPC, so the same gates, limits and metrics apply: shown here by the
probabilities (within 1e-6 for every shared DICOM file), by the error bodies (the cxr.v1.Error of the gRPC code
the gRPC API answers) and by the request counter, which counts HTTP requests too.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from google.protobuf import json_format
from PIL import Image

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from tests.e2e.limits import GATEWAY_MAX_IMAGE_BYTES

TIMEOUT = 120


@pytest.fixture(scope="module")
def gateway_url(gateway_service) -> str:
    assert gateway_service.http_port > 0, "the gateway reports its HTTP port in the port file"
    return f"http://127.0.0.1:{gateway_service.http_port}"


@pytest.fixture(scope="module")
def inference_url(inference_service) -> str:
    assert inference_service.http_port > 0
    return f"http://127.0.0.1:{inference_service.http_port}"


def test_json_api_answers_as_grpc_for_every_shared_dicom(gateway_url, gateway_stub, dicom_dir: Path):
    files = sorted(dicom_dir.rglob("*.dcm"))
    assert len(files) == 7
    for path in files:
        data = path.read_bytes()
        by_grpc = gateway_stub.Classify(pb.ClassifyRequest(image=data, request_id="grpc"), timeout=TIMEOUT)
        answer = requests.post(
            f"{gateway_url}/v1/classify",
            data=data,
            params={"request_id": "http"},
            headers={"Content-Type": "application/dicom"},
            timeout=TIMEOUT,
        )
        assert answer.status_code == 200, answer.text
        # the protobuf JSON mapping of the same message: it parses back into a ClassifyResponse
        by_http = json_format.ParseDict(answer.json(), pb.ClassifyResponse())
        assert by_http.request_id == "http"
        assert [c.label for c in by_http.classes] == [c.label for c in by_grpc.classes]
        np.testing.assert_allclose(
            [c.probability for c in by_http.classes], [c.probability for c in by_grpc.classes], atol=1e-6, rtol=0
        )
        assert (by_http.top_class, by_http.model_name, by_http.model_version, by_http.model_sha256) == (
            by_grpc.top_class,
            by_grpc.model_name,
            by_grpc.model_version,
            by_grpc.model_sha256,
        )
        assert list(by_http.notices) == list(by_grpc.notices)
        assert by_http.image_format == "dicom"


def test_multipart_upload_with_form_fields_and_heatmap(gateway_url, gateway_stub, dicom_dir: Path):
    path = sorted(dicom_dir.rglob("*.dcm"))[0]
    by_grpc = gateway_stub.Classify(
        pb.ClassifyRequest(image=path.read_bytes(), model_name="custom_cnn", model_version="2", return_heatmap=True),
        timeout=TIMEOUT,
    )
    answer = requests.post(
        f"{gateway_url}/v1/classify",
        files={"image": (path.name, path.read_bytes())},
        data={"model": "custom_cnn", "version": "2", "heatmap": "true"},
        timeout=TIMEOUT,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["modelName"], body["modelVersion"]) == ("custom_cnn", "2")
    np.testing.assert_allclose(
        [c["probability"] for c in body["classes"]], [c.probability for c in by_grpc.classes], atol=1e-6, rtol=0
    )
    png = base64.b64decode(body["heatmap"]["png"])
    assert png == by_grpc.heatmap.png
    assert Image.open(io.BytesIO(png)).size[0] > 0
    assert body["heatmap"]["label"] == body["topClass"]


def test_models_and_health(gateway_url, gateway_stub):
    answer = requests.get(f"{gateway_url}/v1/models", timeout=TIMEOUT)
    assert answer.status_code == 200
    by_grpc = gateway_stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)
    assert json_format.ParseDict(answer.json(), pb.ListModelsResponse()) == by_grpc
    health = requests.get(f"{gateway_url}/healthz", timeout=TIMEOUT)
    assert (health.status_code, health.json()) == (200, {"status": "SERVING"})


def _metric(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


# (request, HTTP status, gRPC code name, reason, whether the servicer answered it: then it is counted in the
# same metrics as gRPC; the adapter's own parse errors are not, as a gRPC message that does not parse is not)
@pytest.mark.parametrize(
    ("send", "status", "code_name", "reason", "counted"),
    [
        (
            dict(data=b"\x89PNG\r\n\x1a\n" + b"\0" * 40, headers={"Content-Type": "image/png"}),
            400,
            "INVALID_ARGUMENT",
            None,
            True,
        ),
        (dict(data=b"", headers={"Content-Type": "image/png"}), 400, "INVALID_ARGUMENT", None, True),
        (dict(params={"model": "no_such_model"}), 404, "NOT_FOUND", None, True),
        (dict(data=b"x" * 10, params={"model": "../etc"}), 400, "INVALID_ARGUMENT", "bad_model_name", True),
        (dict(data=b"x" * 10, params={"version": "v2"}), 400, "INVALID_ARGUMENT", "bad_model_version", True),
        (dict(data=b"x" * 10, params={"heatmap": "maybe"}), 400, "INVALID_ARGUMENT", "bad_field", False),
        (dict(data=b"x" * 10, params={"format": "tiff"}), 400, "INVALID_ARGUMENT", "bad_format", False),
        (dict(files={"other": ("a.png", b"x")}), 400, "INVALID_ARGUMENT", "empty", False),
    ],
)
def test_gateway_errors_are_the_grpc_codes_in_json(
    gateway_url, gateway_service, dicom_dir, send, status, code_name, reason, counted
):
    if "data" not in send and "files" not in send:  # reaches the upstream: needs a readable image
        send = {**send, "data": sorted(dicom_dir.rglob("*.dcm"))[0].read_bytes()}
    series = f'cxr_gateway_requests_total{{code="{code_name}"'
    before = _metric(gateway_service.metrics_text(), series)
    answer = requests.post(f"{gateway_url}/v1/classify", timeout=TIMEOUT, **send)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["codeName"] == code_name and body["code"] == getattr(grpc.StatusCode, code_name).value[0]
    assert body["message"]
    if reason:
        assert body["reason"] == reason
    after = _metric(gateway_service.metrics_text(), series)
    assert after == before + (1 if counted else 0), "an HTTP request is counted by the same metrics as a gRPC one"
    assert requests.get(f"{gateway_url}/healthz", timeout=TIMEOUT).status_code == 200


def test_gateway_refuses_a_body_beyond_the_limit(gateway_url):
    answer = requests.post(
        f"{gateway_url}/v1/classify", data=b"\0" * (GATEWAY_MAX_IMAGE_BYTES + 128 * 1024), timeout=TIMEOUT
    )
    assert answer.status_code == 413
    assert answer.json()["reason"] == "too_large"


# ---- the inference service's KServe v2 REST, with a plain HTTP client --------------------------------------------


def _infer(url: str, model: str, document: dict, binary: bytes = b"", version: str = "", headers=None):
    path = f"{url}/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    header = json.dumps(document).encode()
    extra = {"Inference-Header-Content-Length": str(len(header))} if binary else {}
    return requests.post(path, data=header + binary, headers={**extra, **(headers or {})}, timeout=TIMEOUT)


def _image_input(images: np.ndarray, binary: bool) -> dict:
    entry = {"name": "image", "datatype": "UINT8", "shape": list(images.shape)}
    if binary:
        entry["parameters"] = {"binary_data_size": images.nbytes}
    else:
        entry["data"] = images.reshape(-1).tolist()
    return entry


def test_inference_rest_json_and_binary_tensors_agree(inference_url):
    images = np.random.default_rng(0).integers(0, 256, (2, 1, 64, 64), dtype=np.uint8)
    by_json = _infer(inference_url, "custom_cnn", {"id": "j", "inputs": [_image_input(images, False)]})
    assert by_json.status_code == 200 and by_json.headers["content-type"] == "application/json"
    body = by_json.json()
    assert body["id"] == "j" and body["model_name"] == "custom_cnn" and len(body["parameters"]["model_sha256"]) == 64
    outputs = {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in body["outputs"]}
    assert set(outputs) == {"probabilities", "logits", "cam", "ood_score"}

    by_binary = _infer(
        inference_url,
        "custom_cnn",
        {
            "inputs": [_image_input(images, True)],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        },
        images.tobytes(),
    )
    assert by_binary.status_code == 200
    length = int(by_binary.headers["Inference-Header-Content-Length"])
    header = json.loads(by_binary.content[:length])
    (out,) = header["outputs"]
    assert out["parameters"]["binary_data_size"] == 2 * 3 * 4
    probabilities = np.frombuffer(by_binary.content[length:], "<f4").reshape(out["shape"])
    np.testing.assert_allclose(probabilities, outputs["probabilities"], rtol=0, atol=1e-7)


def test_inference_rest_classification_output_as_json_strings(inference_url):
    images = np.zeros((1, 1, 64, 64), np.uint8)
    answer = _infer(
        inference_url,
        "resnet50",
        {
            "inputs": [_image_input(images, False)],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
        },
    )
    assert answer.status_code == 200, answer.text
    (out,) = answer.json()["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [1, 2]
    score, index, label = out["data"][0].split(":", 2)
    assert float(score) > 0 and int(index) in (0, 1, 2) and label


@pytest.mark.parametrize(
    ("method", "path", "send", "status", "fragment"),
    [
        ("get", "/v2/health/live", {}, 200, None),
        ("get", "/v2/health/ready", {}, 200, None),
        ("get", "/v2/models/custom_cnn/ready", {}, 200, None),
        ("get", "/v2/models/no_such_model/ready", {}, 400, None),  # Triton: not ready is 400
        ("get", "/v2/models/no_such_model", {}, 404, "no_such_model"),
        ("get", "/v2/models/custom_cnn/versions/9/config", {}, 404, "no version 9"),
        ("post", "/v2/models/custom_cnn/infer", {"data": b"{not json"}, 400, "not valid JSON"),
        (
            "post",
            "/v2/models/custom_cnn/infer",
            {"json": {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 64, 64], "data": [1, 2]}]}},
            400,
            "expected 4096 values",
        ),
        (
            "post",
            "/v2/models/custom_cnn/infer",
            {
                "json": {
                    "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 2, 2], "data": [1, 2, 3, 400]}]
                }
            },
            400,
            "out of range for UINT8",
        ),
        (
            "post",
            "/v2/models/custom_cnn/infer",
            {
                "json": {
                    "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 64, 64], "data": [0.5] * 4096}]
                }
            },
            400,
            "expected datatype UINT8, received FP32",
        ),
        (
            "post",
            "/v2/models/custom_cnn/infer",
            {
                "json": {
                    "inputs": [
                        {
                            "name": "image",
                            "datatype": "UINT8",
                            "shape": [1, 1, 64, 64],
                            "parameters": {"binary_data_size": 4096},
                        }
                    ]
                },
                "headers": {"Inference-Header-Content-Length": "x"},
            },
            400,
            "byte count",
        ),
        ("post", "/v2/models/no_such_model/infer", {"json": {"inputs": []}}, 404, "no_such_model"),
        ("post", "/v2/repository/models/custom_cnn/load", {}, 400, "model control mode"),  # FAILED_PRECONDITION
    ],
)
def test_inference_rest_status_codes(inference_url, method, path, send, status, fragment):
    answer = getattr(requests, method)(inference_url + path, timeout=TIMEOUT, **send)
    assert answer.status_code == status, answer.text
    if fragment:
        assert fragment in answer.json()["error"]


def test_inference_rest_binary_sizes_must_add_up(inference_url):
    images = np.zeros((1, 1, 64, 64), np.uint8)
    short = _infer(inference_url, "custom_cnn", {"inputs": [_image_input(images, True)]}, images.tobytes()[:-1])
    assert short.status_code == 400 and "goes past the end" in short.json()["error"]
    extra = _infer(inference_url, "custom_cnn", {"inputs": [_image_input(images, True)]}, images.tobytes() + b"xx")
    assert extra.status_code == 400 and "2 bytes of binary data after" in extra.json()["error"]


def test_inference_rest_bytes_tensor_roundtrip_format():
    """BYTES outputs in binary are Triton's length-prefixed elements (the same codec as gRPC raw contents)."""
    from cxr.generated.inference import grpc_service_pb2 as ipb
    from services.inference.rest import infer_response

    response = ipb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="labels", datatype="BYTES", shape=[2])
    response.raw_output_contents.append(struct.pack("<I", 1) + b"a" + struct.pack("<I", 2) + b"bc")
    body, length = infer_response(response, {"": False})
    assert length is None and json.loads(body)["outputs"][0]["data"] == ["a", "bc"]
    body, length = infer_response(response, {"": True})
    assert json.loads(body[:length])["outputs"][0]["parameters"]["binary_data_size"] == 11
    assert body[length:] == response.raw_output_contents[0]
