"""The dynamic batcher seen through the protocol: concurrent clients with mixed batch sizes get their own rows,
deadlines and request timeouts drop queued requests before compute, cancellation, and a full queue."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from inference.server_process import start_server, with_queue_delay
from inference.tritonclient_checks.triton_helpers import image_input

QUEUE_DELAY_S = 1.0


@pytest.fixture(scope="module")
def batching_server(served_repository, tmp_path_factory):
    """resnet50 waits up to 1 s to fill a batch (a request alone too), holds at most 3 queued requests, and lets a
    request's own timeout shorten its wait. mobilenet keeps the exported defaults (to compare answers against)."""
    repo = tmp_path_factory.mktemp("batching") / "model_repository"
    shutil.copytree(served_repository, repo)
    config_path = repo / "resnet50" / "config.pbtxt"
    config = config_path.read_text()
    config = with_queue_delay(config, int(QUEUE_DELAY_S * 1e6))
    config = config.replace("max_queue_size: 256", "max_queue_size: 3\n    allow_timeout_override: true")
    config_path.write_text(config)
    handle = start_server(repo, tmp_path_factory.mktemp("server"), "--model-control", "explicit", "--load-model", "*")
    yield handle
    handle.stop()


@pytest.fixture
def client(batching_server):
    with triton.InferenceServerClient(batching_server.address) as c:
        yield c


def stats(client):
    return client.get_inference_statistics("resnet50", "1").model_stats[0]


class Answers:
    def __init__(self):
        self.items: dict[str, object] = {}
        self.lock = threading.Lock()

    def callback(self, key):
        def store(result, error):
            with self.lock:
                self.items[key] = error if error is not None else result

        return store

    def wait(self, count, timeout=30):
        end = time.monotonic() + timeout
        while len(self.items) < count and time.monotonic() < end:
            time.sleep(0.02)
        return self.items


def test_concurrent_clients_with_mixed_batch_sizes_get_their_own_rows(client, radiographs):
    reference = client.infer("resnet50", [image_input(radiographs)]).as_numpy("probabilities")
    before = stats(client)
    answers = Answers()
    asks = {"a": [0], "b": [1, 2, 3], "c": [4, 5]}
    for key, rows in asks.items():
        client.async_infer("resnet50", [image_input(radiographs[rows])], answers.callback(key), request_id=key)
    got = answers.wait(3)
    for key, rows in asks.items():
        result = got[key]
        assert not isinstance(result, Exception), result
        assert result.get_response().id == key
        np.testing.assert_allclose(result.as_numpy("probabilities"), reference[rows], rtol=1e-4, atol=1e-6)
    after = stats(client)
    assert after.execution_count - before.execution_count == 1, "the three requests ran as one batch"
    assert after.inference_count - before.inference_count == 6
    assert any(b.batch_size == 6 for b in after.batch_stats)


def test_a_grpc_deadline_that_passes_in_the_queue_drops_the_request_before_compute(client, radiographs):
    before = stats(client)
    start = time.monotonic()
    with pytest.raises(InferenceServerException) as error:
        client.infer("resnet50", [image_input(radiographs[:1])], client_timeout=0.3)
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert time.monotonic() - start < QUEUE_DELAY_S
    time.sleep(QUEUE_DELAY_S + 0.5)  # past the point where the batch would have run
    after = stats(client)
    assert after.inference_count == before.inference_count, "the expired request was computed anyway"
    assert client.infer("resnet50", [image_input(radiographs[:1])]).as_numpy("logits").shape == (1, 3)


def test_a_request_timeout_parameter_shortens_its_queue_wait(client, radiographs):
    before = stats(client)
    with pytest.raises(InferenceServerException) as error:
        client.infer("resnet50", [image_input(radiographs[:1])], timeout=200_000)  # microseconds, Triton's meaning
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "not computed" in error.value.message()
    after = stats(client)
    assert after.inference_count == before.inference_count
    assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1


def test_a_cancelled_request_is_not_computed_and_its_batch_mates_are_answered(client, radiographs):
    before = stats(client)
    answers = Answers()
    doomed = client.async_infer("resnet50", [image_input(radiographs[:1])], answers.callback("doomed"))
    client.async_infer("resnet50", [image_input(radiographs[1:3])], answers.callback("kept"), request_id="kept")
    time.sleep(0.2)
    doomed.cancel()
    got = answers.wait(2)
    assert "CANCELLED" in str(got["doomed"])
    assert got["kept"].as_numpy("probabilities").shape == (2, 3)
    after = stats(client)
    assert after.inference_count - before.inference_count == 2, "only the kept request's rows were computed"


def test_a_full_queue_answers_resource_exhausted_at_once(client, radiographs):
    answers = Answers()
    for i in range(3):  # max_queue_size 3: these fill the queue for a second
        client.async_infer("resnet50", [image_input(radiographs[i : i + 1])], answers.callback(f"q{i}"))
    time.sleep(0.2)
    start = time.monotonic()
    with pytest.raises(InferenceServerException) as error:
        client.infer("resnet50", [image_input(radiographs[3:4])])
    assert time.monotonic() - start < QUEUE_DELAY_S / 2
    assert error.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "max_queue_size" in error.value.message()
    got = answers.wait(3)
    assert all(not isinstance(r, Exception) for r in got.values()), got
    # the other models are unaffected
    assert client.infer("mobilenet", [image_input(radiographs[:1])]).as_numpy("logits").shape == (1, 3)
