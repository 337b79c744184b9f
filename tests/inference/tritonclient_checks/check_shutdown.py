"""SIGTERM: readiness turns false first, queued and running requests finish, new ones are refused, then exit."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from inference.server_process import start_server, with_queue_delay
from inference.tritonclient_checks.triton_helpers import image_input


def test_sigterm_turns_readiness_off_first_and_drains_queued_requests(own_repository, radiographs, tmp_path):
    config_path = own_repository / "mobilenet" / "config.pbtxt"
    # Requests wait 2 s in the queue: they are still queued when SIGTERM arrives.
    config_path.write_text(with_queue_delay(config_path.read_text(), 2_000_000))
    server = start_server(own_repository, tmp_path / "server", "--grace-period", "20")
    with triton.InferenceServerClient(server.address) as client, grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        )
        answers, errors = [], []
        lock = threading.Lock()

        def callback(result, error):
            with lock:
                (errors if error else answers).append(error or result)

        for i in range(3):
            client.async_infer("mobilenet", [image_input(radiographs[2 * i : 2 * i + 2])], callback, request_id=f"q{i}")
        time.sleep(0.3)
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)

        # Draining: not ready, health NOT_SERVING, new inference refused with UNAVAILABLE; the queued ones still wait.
        assert not client.is_server_ready()
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        with pytest.raises(InferenceServerException) as refused:
            client.infer("mobilenet", [image_input(radiographs[:1])])
        assert refused.value.status() == "StatusCode.UNAVAILABLE" and "shutting down" in refused.value.message()
        assert len(answers) + len(errors) == 0, "queued requests are not cut off"

        returncode = server.process.wait(30)
        exited_after = time.monotonic() - sent
    assert returncode == 0
    assert errors == [] and sorted(a.get_response().id for a in answers) == ["q0", "q1", "q2"]
    for answer in answers:
        assert answer.as_numpy("probabilities").shape == (2, 3)
    assert exited_after < 20, "the server stops within its grace period"
    log = server.log_text()
    assert log.index("readiness false") < log.index("server stopped")
