"""Model repository control through tritonclient: broken models reported while the rest serve, model control
`none` and `explicit`, load, unload, and an atomic reload under load."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from inference.server_process import start_server, with_queue_delay
from inference.tritonclient_checks.triton_helpers import expect_error, image_input


def test_broken_models_are_listed_with_their_reason_while_the_others_serve(own_repository, radiographs, tmp_path):
    shutil.copytree(own_repository / "mobilenet", own_repository / "bad_config")
    (own_repository / "bad_config" / "config.pbtxt").write_text('name: "bad_config"\nmax_batch_size: "many"\n')
    shutil.copytree(own_repository / "mobilenet", own_repository / "wrong_dims")
    config = (own_repository / "wrong_dims" / "config.pbtxt").read_text()
    (own_repository / "wrong_dims" / "config.pbtxt").write_text(
        config.replace('name: "mobilenet"', 'name: "wrong_dims"').replace("dims: 64", "dims: 32")
    )
    shutil.copytree(own_repository / "resnet50", own_repository / "truncated")
    config = (own_repository / "truncated" / "config.pbtxt").read_text()
    (own_repository / "truncated" / "config.pbtxt").write_text(config.replace('name: "resnet50"', 'name: "truncated"'))
    onnx = own_repository / "truncated" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:5000])

    # version_policy specific: version 1 and a version 5 that has no folder
    config_path = own_repository / "custom_cnn" / "config.pbtxt"
    config = config_path.read_text()
    assert "version_policy {\n  all {\n  }\n}" in config
    config_path.write_text(
        config.replace("version_policy {\n  all {\n  }\n}", "version_policy { specific { versions: [1, 5] } }")
    )

    server = start_server(own_repository, tmp_path / "server")  # model control none: load everything at start
    try:
        with triton.InferenceServerClient(server.address) as client:
            assert client.is_server_ready(), "the healthy models serve although some are broken"
            index = {m.name: m for m in client.get_model_repository_index().models}
            for name in ("bad_config", "wrong_dims", "truncated"):
                assert index[name].state == "UNAVAILABLE", name
            assert "config.pbtxt" in index["bad_config"].reason
            assert "dims [1, 32, 32]" in index["wrong_dims"].reason and "64" in index["wrong_dims"].reason
            assert "version 1" in index["truncated"].reason
            for name in ("custom_cnn", "mobilenet", "resnet50", "ensemble"):
                assert client.is_model_ready(name), name
            rows = {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}
            assert rows[("custom_cnn", "1")] == ("READY", "")
            assert rows[("custom_cnn", "5")][0] == "UNAVAILABLE" and "no folder" in rows[("custom_cnn", "5")][1]
            assert ("custom_cnn", "2") not in rows, "version 2 is not in the specific policy"
            assert rows[("mobilenet", "1")] == ("READY", "")
            newest = client.infer("custom_cnn", [image_input(radiographs[:1])])
            assert newest.get_response().model_version == "1"
            expect_error(
                "NOT_FOUND",
                lambda: client.infer("custom_cnn", [image_input(radiographs[:1])], model_version="2"),
                "served versions: [1]",
            )
            expect_error(
                "UNAVAILABLE",
                lambda: client.infer("wrong_dims", [image_input(radiographs[:1])]),
                "wrong_dims",
                "not ready",
            )
            result = client.infer("mobilenet", [image_input(radiographs[:2])])
            assert result.as_numpy("probabilities").shape == (2, 3)
            # model control none: the repository is fixed at start
            expect_error("FAILED_PRECONDITION", lambda: client.load_model("mobilenet"), "explicit")
            expect_error("FAILED_PRECONDITION", lambda: client.unload_model("mobilenet"), "explicit")
    finally:
        assert server.stop() == 0


def test_explicit_control_loads_and_unloads(own_repository, radiographs, tmp_path):
    server = start_server(
        own_repository, tmp_path / "server", "--model-control", "explicit", "--load-model", "custom_cnn"
    )
    try:
        with triton.InferenceServerClient(server.address) as client:
            index = {m.name: m for m in client.get_model_repository_index().models}
            assert index["mobilenet"].state == "UNAVAILABLE" and index["mobilenet"].reason == "not loaded"
            with grpc.insecure_channel(server.address) as channel:  # tritonclient's own stub: its client lacks `ready`
                ready_only = service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
                    service_pb2.RepositoryIndexRequest(ready=True), timeout=10
                )
            assert {(m.name, m.version) for m in ready_only.models} == {("custom_cnn", "1"), ("custom_cnn", "2")}
            expect_error("UNAVAILABLE", lambda: client.infer("mobilenet", [image_input(radiographs[:1])]), "not loaded")

            client.load_model("mobilenet")
            assert client.is_model_ready("mobilenet")
            assert client.infer("mobilenet", [image_input(radiographs[:1])]).as_numpy("logits").shape == (1, 3)

            client.unload_model("mobilenet")
            assert not client.is_model_ready("mobilenet")
            expect_error("UNAVAILABLE", lambda: client.infer("mobilenet", [image_input(radiographs[:1])]), "unloaded")
            index = {m.name: m for m in client.get_model_repository_index().models}
            assert (index["mobilenet"].state, index["mobilenet"].reason) == ("UNAVAILABLE", "unloaded")
            assert client.is_model_ready("custom_cnn"), "unloading one model leaves the others"

            expect_error("NOT_FOUND", lambda: client.load_model("no_such_model"), "no_such_model")
            expect_error("NOT_FOUND", lambda: client.load_model("../model_repository/custom_cnn"))
    finally:
        assert server.stop() == 0


def test_reload_swaps_atomically_and_running_requests_finish_on_the_old_version(own_repository, radiographs, tmp_path):
    # Hold requests in the queue for a while, so some are in flight while the reload happens.
    config_path = own_repository / "custom_cnn" / "config.pbtxt"
    config = config_path.read_text()
    assert "max_queue_delay_microseconds: 500" in config
    config_path.write_text(with_queue_delay(config, 800_000))
    server = start_server(own_repository, tmp_path / "server", "--model-control", "explicit", "--load-model", "*")
    try:
        with triton.InferenceServerClient(server.address) as client:
            v1_logits = client.infer("custom_cnn", [image_input(radiographs)], model_version="1").as_numpy("logits")
            answers, errors = [], []
            lock = threading.Lock()

            def callback(result, error):
                with lock:
                    (errors if error else answers).append(error or result)

            for i in range(4):  # queued on version 2 (the newest) when the reload starts
                client.async_infer("custom_cnn", [image_input(radiographs[i : i + 1])], callback, request_id=f"old{i}")
            time.sleep(0.1)
            shutil.copytree(own_repository / "custom_cnn" / "1", own_repository / "custom_cnn" / "3")
            stop = threading.Event()
            during: list = []

            def hammer():  # requests keep coming during the reload; none may fail
                while not stop.is_set():
                    try:
                        during.append(client.infer("custom_cnn", [image_input(radiographs[:1])]))
                    except InferenceServerException as e:
                        during.append(e)

            thread = threading.Thread(target=hammer)
            thread.start()
            client.load_model("custom_cnn")  # the reload: returns once version 3 is loaded, warmed up and swapped in
            stop.set()
            thread.join(30)
            deadline = time.monotonic() + 30
            while len(answers) + len(errors) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)

            assert errors == [] and len(answers) == 4
            assert {a.get_response().model_version for a in answers} == {"2"}, (
                "running requests finish on the old version"
            )
            failures = [d for d in during if isinstance(d, Exception)]
            assert failures == [], failures
            assert {d.get_response().model_version for d in during} <= {"2", "3"}
            after = client.infer("custom_cnn", [image_input(radiographs)])
            assert after.get_response().model_version == "3"
            np.testing.assert_allclose(after.as_numpy("logits"), v1_logits, rtol=1e-5, atol=1e-6)
            assert sorted(client.get_model_metadata("custom_cnn").versions) == ["1", "2", "3"]

            # A reload that fails leaves the serving versions in place.
            config_path.write_text("this is not a ModelConfig")
            expect_error("INVALID_ARGUMENT", lambda: client.load_model("custom_cnn"), "config.pbtxt")
            assert client.is_model_ready("custom_cnn")
            assert client.infer("custom_cnn", [image_input(radiographs[:1])]).get_response().model_version == "3"
    finally:
        assert server.stop() == 0
