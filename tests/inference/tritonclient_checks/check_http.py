"""The stock tritonclient.http (sync and aio), unmodified, drives our inference server's KServe v2 REST port:
health, metadata, config, statistics, infer with JSON and with binary tensors, version selection, the
classification extension, compression, load/unload and each error with Triton's HTTP status. Answers are held
equal to the same server's gRPC answers (tritonclient.grpc): one data plane behind two transports.

Like the other checks this module must not import our generated code (tritonclient registers the same symbols).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from inference.server_process import with_queue_delay
from inference.tritonclient_checks.check_batching import batching_server  # noqa: F401 - a fixture
from inference.tritonclient_checks.check_protocol import MODELS, read_labels, sha256_file
from inference.tritonclient_checks.triton_helpers import image_input as grpc_image_input


def http_input(
    images: np.ndarray, binary: bool = True, name: str = "image", datatype: str = "UINT8", module=triton
) -> triton.InferInput:
    tensor = module.InferInput(name, list(images.shape), datatype)
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def expect_http_error(status: int, call, *fragments: str) -> str:
    with pytest.raises(InferenceServerException) as error:
        call()
    assert error.value.status() == str(status), (error.value.status(), error.value.message())
    for fragment in fragments:
        assert fragment in error.value.message(), error.value.message()
    return error.value.message()


@pytest.fixture(scope="module")
def client(server):
    assert server.http_port > 0, "the server reports its HTTP port in the port file"
    c = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}", network_timeout=120, connection_timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc_client(server):
    with triton_grpc.InferenceServerClient(server.address) as c:
        yield c


def test_health_readiness_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "cxr-inference"
    assert {"classification", "model_repository", "statistics"} <= set(metadata["extensions"])
    for name in MODELS:
        assert client.is_model_ready(name), name
    assert client.is_model_ready("custom_cnn", "1") and client.is_model_ready("custom_cnn", "2")
    assert not client.is_model_ready("custom_cnn", "7")
    assert not client.is_model_ready("no_such_model")


def test_model_metadata_and_config(client, served_repository):
    metadata = client.get_model_metadata("custom_cnn")
    assert metadata["platform"] == "onnxruntime_onnx" and sorted(metadata["versions"]) == ["1", "2"]
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 1, 64, 64]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    assert outputs == {
        "probabilities": ("FP32", [-1, 3]),
        "logits": ("FP32", [-1, 3]),
        "cam": ("FP32", [-1, 3, 2, 2]),
        "ood_score": ("FP32", [-1, 1]),
    }
    assert client.get_model_metadata("custom_cnn", "1")["name"] == "custom_cnn"

    config = client.get_model_config("custom_cnn")
    assert config["name"] == "custom_cnn" and config["max_batch_size"] == 32  # numbers, as Triton's JSON has them
    assert config["input"][0]["dims"] == [1, 64, 64] and config["input"][0]["data_type"] == "TYPE_UINT8"
    assert "all" in config["version_policy"]
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] > 0
    assert config["parameters"]["cxr.classes"]["string_value"].split(",") == read_labels(
        served_repository / "custom_cnn"
    )


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_grpc_on_real_radiographs(client, grpc_client, radiographs, served_repository, binary):
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "logits", "cam")]
    result = client.infer("mobilenet", [http_input(radiographs, binary)], request_id="rest-1", outputs=outputs)
    response = result.get_response()
    assert response["id"] == "rest-1" and response["model_name"] == "mobilenet" and response["model_version"] == "1"
    assert response["parameters"]["model_sha256"] == sha256_file(served_repository / "mobilenet/1/model.onnx")
    assert all(("parameters" in o) == binary for o in response["outputs"]), "binary outputs exactly when asked"
    by_grpc = grpc_client.infer("mobilenet", [grpc_image_input(radiographs)])
    for name, shape in (("probabilities", (6, 3)), ("logits", (6, 3)), ("cam", (6, 3, 2, 2))):
        got = result.as_numpy(name)
        assert got.shape == shape and got.dtype == np.float32, name
        np.testing.assert_allclose(got, by_grpc.as_numpy(name), rtol=1e-5, atol=1e-6)


def test_default_outputs_are_binary_and_compression_works(client, radiographs):
    plain = client.infer("custom_cnn", [http_input(radiographs)])  # no outputs named: binary_data_output
    assert all("binary_data_size" in o["parameters"] for o in plain.get_response()["outputs"])
    for algorithm in ("gzip", "deflate"):
        squeezed = client.infer(
            "custom_cnn",
            [http_input(radiographs)],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_allclose(
            squeezed.as_numpy("probabilities"), plain.as_numpy("probabilities"), rtol=1e-5, atol=1e-6
        )


def test_version_selection(client, radiographs):
    newest = client.infer("custom_cnn", [http_input(radiographs)])
    assert newest.get_response()["model_version"] == "2"
    v1 = client.infer("custom_cnn", [http_input(radiographs)], model_version="1")
    v2 = client.infer("custom_cnn", [http_input(radiographs, binary=False)], model_version="2")
    assert v1.get_response()["model_version"] == "1" and v2.get_response()["model_version"] == "2"
    assert v1.get_response()["parameters"]["model_sha256"] != v2.get_response()["parameters"]["model_sha256"]
    assert not np.allclose(v1.as_numpy("logits"), v2.as_numpy("logits"))
    np.testing.assert_allclose(newest.as_numpy("logits"), v2.as_numpy("logits"), rtol=1e-5, atol=1e-6)


def test_classification_extension(client, radiographs, served_repository):
    labels = read_labels(served_repository / "resnet50")
    result = client.infer(
        "resnet50", [http_input(radiographs)], outputs=[triton.InferRequestedOutput("probabilities", class_count=2)]
    )
    top = result.as_numpy("probabilities")
    assert top.shape == (6, 2)
    probabilities = client.infer("resnet50", [http_input(radiographs)]).as_numpy("probabilities")
    for row, entries in enumerate(top):
        parsed = [(e.decode() if isinstance(e, bytes) else e).split(":", 2) for e in entries]
        assert [int(p[1]) for p in parsed] == list(np.argsort(-probabilities[row], kind="stable")[:2])
        for score, index, label in parsed:
            assert label == labels[int(index)]
            assert float(score) == pytest.approx(float(probabilities[row, int(index)]), abs=1e-5)


def test_statistics_count_http_requests(client, radiographs):
    before = client.get_inference_statistics("resnet50", "1")["model_stats"][0]
    for _ in range(2):
        client.infer("resnet50", [http_input(radiographs[:3])])
    after = client.get_inference_statistics("resnet50", "1")["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 6
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 2
    every = client.get_inference_statistics()["model_stats"]
    assert {(s["name"], s["version"]) for s in every} >= {("custom_cnn", "1"), ("custom_cnn", "2")}


def test_repository_index_unload_and_load(client, radiographs):
    index = {(m["name"], m.get("version")): m["state"] for m in client.get_model_repository_index()}
    assert index[("resnet50", "1")] == "READY" and index[("custom_cnn", "2")] == "READY"
    client.unload_model("resnet50")
    try:
        assert not client.is_model_ready("resnet50")
        states = {m["name"]: m["state"] for m in client.get_model_repository_index()}
        assert states["resnet50"] == "UNAVAILABLE"
        expect_http_error(503, lambda: client.infer("resnet50", [http_input(radiographs[:1])]), "resnet50")
    finally:
        client.load_model("resnet50")
    assert client.is_model_ready("resnet50")
    assert client.infer("resnet50", [http_input(radiographs[:1])]).as_numpy("probabilities").shape == (1, 3)
    expect_http_error(404, lambda: client.load_model("no_such_model"), "no_such_model")


def test_errors_have_tritons_http_status(client, radiographs):
    expect_http_error(404, lambda: client.infer("no_such_model", [http_input(radiographs[:1])]), "no_such_model")
    expect_http_error(
        404, lambda: client.infer("custom_cnn", [http_input(radiographs[:1])], model_version="9"), "no version 9"
    )
    expect_http_error(404, lambda: client.get_model_metadata("no_such_model"))
    expect_http_error(404, lambda: client.get_model_config("custom_cnn", "9"))
    expect_http_error(404, lambda: client.get_inference_statistics("no_such_model"))
    floats = radiographs[:1].astype(np.float32)
    for binary in (True, False):
        expect_http_error(
            400,
            lambda b=binary: client.infer("custom_cnn", [http_input(floats, b, datatype="FP32")]),
            "expected datatype UINT8, received FP32",
        )
    expect_http_error(
        400,
        lambda: client.infer("custom_cnn", [http_input(np.zeros((1, 1, 32, 32), np.uint8))]),
        "expected shape [-1,1,64,64]",
        "received [1,1,32,32]",
    )
    expect_http_error(
        400,
        lambda: client.infer("custom_cnn", [http_input(np.zeros((33, 1, 64, 64), np.uint8))]),
        "1..32",
        "received 33",
    )
    expect_http_error(
        400, lambda: client.infer("custom_cnn", [http_input(radiographs[:1], name="img")]), "no input 'img'"
    )
    expect_http_error(
        400,
        lambda: client.infer(
            "custom_cnn", [http_input(radiographs[:1])], outputs=[triton.InferRequestedOutput("heatmap")]
        ),
        "no output 'heatmap'",
    )
    expect_http_error(
        400, lambda: client.infer("custom_cnn", [http_input(radiographs[:1])], timeout=-5), "timeout parameter"
    )
    assert client.is_server_ready(), "bad requests must not hurt the server"


def test_aio_client(server, radiographs, grpc_client):
    async def run():
        c = triton_aio.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            assert await c.is_server_live() and await c.is_server_ready()
            assert await c.is_model_ready("ensemble")
            assert (await c.get_model_metadata("ensemble"))["name"] == "ensemble"
            answers = await asyncio.gather(
                *[
                    c.infer(
                        "ensemble",
                        [http_input(radiographs[i : i + 1], binary=i % 2 == 0, module=triton_aio)],
                        request_id=f"aio-{i}",
                    )
                    for i in range(6)
                ]
            )
            with pytest.raises(InferenceServerException) as error:
                await c.infer("no_such_model", [http_input(radiographs[:1], module=triton_aio)])
            assert error.value.status() == "404"
            return answers
        finally:
            await c.close()

    answers = asyncio.run(run())
    by_grpc = grpc_client.infer("ensemble", [grpc_image_input(radiographs)]).as_numpy("probabilities")
    for i, answer in enumerate(answers):  # each concurrent request got its own row back
        assert answer.get_response()["id"] == f"aio-{i}"
        np.testing.assert_allclose(answer.as_numpy("probabilities")[0], by_grpc[i], rtol=1e-4, atol=1e-6)


def test_sigterm_drains_http_requests_as_grpc_ones(own_repository, radiographs, tmp_path):
    """The one shutdown: readiness false on HTTP too, queued HTTP requests answered, new ones refused with 503."""
    import signal
    import time

    from inference.server_process import start_server

    config_path = own_repository / "mobilenet" / "config.pbtxt"
    config_path.write_text(with_queue_delay(config_path.read_text(), 2_000_000))
    server = start_server(own_repository, tmp_path / "server", "--grace-period", "20")
    client = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}", concurrency=4, network_timeout=60)
    try:
        queued = [
            client.async_infer("mobilenet", [http_input(radiographs[2 * i : 2 * i + 2])], request_id=f"h{i}")
            for i in range(3)
        ]
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert not client.is_server_ready()
        expect_http_error(503, lambda: client.infer("mobilenet", [http_input(radiographs[:1])]), "shutting down")
        answers = [request.get_result() for request in queued]
        assert [a.get_response()["id"] for a in answers] == ["h0", "h1", "h2"]
        assert all(a.as_numpy("probabilities").shape == (2, 3) for a in answers)
        assert server.process.wait(30) == 0
    finally:
        client.close()
        server.kill()


def test_one_queue_for_both_transports(batching_server, radiographs):  # noqa: F811 - the imported fixture
    """gRPC requests fill resnet50's queue (max_queue_size 3, 1 s batching delay): an HTTP request then finds it
    full and gets Triton's 503 at once; a `timeout` parameter that ends in the queue is 503 too (Triton files both
    as UNAVAILABLE); the queued gRPC requests are answered."""
    import time

    from inference.tritonclient_checks.check_batching import QUEUE_DELAY_S, Answers

    http_client = triton.InferenceServerClient(f"127.0.0.1:{batching_server.http_port}", network_timeout=60)
    try:
        expect_http_error(
            503, lambda: http_client.infer("resnet50", [http_input(radiographs[:1])], timeout=200_000), "not computed"
        )
        with triton_grpc.InferenceServerClient(batching_server.address) as grpc_client:
            answers = Answers()
            for i in range(3):
                grpc_client.async_infer(
                    "resnet50", [grpc_image_input(radiographs[i : i + 1])], answers.callback(f"q{i}")
                )
            time.sleep(0.2)
            start = time.monotonic()
            expect_http_error(
                503, lambda: http_client.infer("resnet50", [http_input(radiographs[3:4])]), "max_queue_size"
            )
            assert time.monotonic() - start < QUEUE_DELAY_S / 2
            got = answers.wait(3)
            assert len(got) == 3 and all(not isinstance(r, Exception) for r in got.values()), got
    finally:
        http_client.close()
