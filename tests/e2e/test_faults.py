"""What a cluster does to the stack every day, under 8-client load through the gateway, with real processes on
loopback: drains with and without a drain delay, a rolling update of two inference replicas, kill -9, a hung
(SIGSTOPped) inference process. Goals are asserted on counts of answers and codes, never on wall-clock time;
the few waits are bounded only so a broken build fails instead of hanging."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from bench.load import ClassifyLoad
from cxr.generated.inference import grpc_service_pb2 as ipb
from cxr.generated.inference import grpc_service_pb2_grpc as ipb_grpc
from tests.gateway import processes
from tests.inference.server_process import with_queue_delay

pytestmark = pytest.mark.slow
MODEL = "custom_cnn"
EXPLICIT = ["--model-control", "explicit", "--load-model", MODEL]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def image(dicom_dir: Path) -> bytes:
    return (dicom_dir / "CR-MONO1-10-chest.dcm").read_bytes()  # 440x440: quick to decode, so load is high


def _inference_answers(address: str) -> tuple[bool, bool] | None:
    """(live, ready) of an inference process, or None when it does not answer."""
    with grpc.insecure_channel(address) as channel:
        stub = ipb_grpc.GRPCInferenceServiceStub(channel)
        try:
            live = stub.ServerLive(ipb.ServerLiveRequest(), timeout=5).live
            ready = stub.ServerReady(ipb.ServerReadyRequest(), timeout=5).ready
            return live, ready
        except grpc.RpcError:
            return None


def _wait(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"never {what} within {timeout:.0f} s")


def _report(test: str, load: ClassifyLoad, **counts) -> None:
    """The figures behind the assertions, for the README and closing notes (`pytest -s` shows them)."""
    print(f"\n[faults] {test}: codes {dict(load.codes())}, integrity {load.integrity()}, {counts}")


def _gateway_log_codes(gateway: processes.Service) -> dict[str, int]:
    """code -> count over the gateway's request log lines (one per request it accepted or refused)."""
    import json

    counts: dict[str, int] = {}
    for line in gateway.log_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("method") in ("Classify", "ClassifyStream") and "code" in entry:
            key = entry["code"] + (f"/{entry['reason']}" if entry.get("reason") else "")
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_inference_drain_delay_keeps_answering(trained_repository: Path, image: bytes, tmp_path: Path):
    """SIGTERM with a drain delay: readiness false at once, every request during the delay answered, exit 0."""
    inference = processes.start_inference(
        trained_repository, tmp_path / "inference", extra=[*EXPLICIT, "--drain-delay", "8", "--grace-period", "5"]
    )
    gateway = processes.start_gateway(inference.address, tmp_path / "gateway")
    processes.wait_ready(gateway.address)
    load = ClassifyLoad(gateway.address, image, clients=8, model_name=MODEL).start()
    try:
        load.wait_answers(16, code="OK")
        inference.process.send_signal(signal.SIGTERM)
        _wait(lambda: _inference_answers(inference.address) == (True, False), "inference not ready after SIGTERM")
        during = load.mark()
        load.wait_answers(16, since=during)
        # direct callers of the inference service are answered too
        with grpc.insecure_channel(inference.address) as channel:
            stub = ipb_grpc.GRPCInferenceServiceStub(channel)
            spec = stub.ModelMetadata(ipb.ModelMetadataRequest(name=MODEL), timeout=10).inputs[0]
            size = int(spec.shape[-1])
            request = ipb.ModelInferRequest(model_name=MODEL)
            request.inputs.add(name=spec.name, datatype="UINT8", shape=[1, 1, size, size])
            request.raw_input_contents.append(bytes(size * size))
            direct = [stub.ModelInfer(request, timeout=30).model_name for _ in range(8)]
        after = load.mark()
        still_in_delay = _inference_answers(inference.address) == (True, False)
        assert still_in_delay, "the drain delay ended before the measurement did (machine too slow for this test)"
        assert load.codes(during, after) == {"OK": after - during}, "every request during the drain delay is answered"
        assert direct == [MODEL] * 8
        assert inference.process.wait(60) == 0
        load.stop()
        assert set(load.codes()) <= {"OK", "UNAVAILABLE"}  # after the delay: refused, so clients retry elsewhere
        assert load.integrity()["lost"] == 0
        _report("inference SIGTERM, drain delay 8 s", load, during_delay=after - during, direct_ok=len(direct))
    finally:
        load.stop()
        inference.kill()
        gateway.kill()


def test_two_replicas_one_draining_loses_nothing(trained_repository: Path, image: bytes, tmp_path: Path):
    """A rolling update: one of two replicas drains and exits; the gateway stays SERVING and answers every request."""
    # --log-successes: each replica's log shows it answered requests
    logged = [*EXPLICIT, "--log-successes"]
    draining = processes.start_inference(
        trained_repository, tmp_path / "a", extra=[*logged, "--drain-delay", "2", "--grace-period", "5"]
    )
    staying = processes.start_inference(trained_repository, tmp_path / "b", extra=logged)
    gateway = processes.start_gateway(
        f"ipv4:{draining.address},{staying.address}", tmp_path / "gateway", extra=["--request-timeout", "60"]
    )
    processes.wait_ready(gateway.address)
    load = ClassifyLoad(gateway.address, image, clients=8, model_name=MODEL, timeout_s=60).start()
    health: list[int] = []
    try:
        load.wait_answers(24, code="OK")
        draining.process.send_signal(signal.SIGTERM)
        while draining.alive():
            health.append(processes.health_status(gateway.address))
            time.sleep(0.05)
        exited = load.mark()
        for _ in range(20):
            health.append(processes.health_status(gateway.address))
            time.sleep(0.05)
        load.wait_answers(24, since=exited)
        load.stop()
        assert draining.process.returncode == 0
        assert load.codes() == {"OK": len(load.answers)}, "no request fails while another replica serves"
        assert load.integrity() == {**load.integrity(), "lost": 0, "duplicated": 0, "mismatched": 0}
        assert health and NOT_SERVING not in health, "the gateway never leaves service while one replica is ready"
        assert '"code":"OK"' in staying.log_text() and '"code":"OK"' in draining.log_text()
        _report("two replicas, one draining", load, health_checks=len(health), not_serving=health.count(NOT_SERVING))
    finally:
        load.stop()
        for service in (gateway, draining, staying):
            service.kill()


@pytest.mark.parametrize("drain_delay", [0, 3])
def test_gateway_sigterm_under_load_fails_no_accepted_request(
    inference_service, image: bytes, tmp_path: Path, drain_delay: int
):
    """Gateway SIGTERM under load: every request it accepted is answered OK; later ones are refused UNAVAILABLE
    (never CANCELLED); with a drain delay, everything during the delay is answered; exit 0."""
    gateway = processes.start_gateway(
        inference_service.address,
        tmp_path / "gateway",
        extra=["--drain-delay", str(drain_delay), "--shutdown-grace", "10"],
    )
    processes.wait_ready(gateway.address)
    load = ClassifyLoad(gateway.address, image, clients=8, model_name=MODEL).start()
    try:
        load.wait_answers(16, code="OK")
        gateway.process.send_signal(signal.SIGTERM)
        if drain_delay:
            _wait(lambda: processes.health_status(gateway.address) == NOT_SERVING, "gateway NOT_SERVING after SIGTERM")
            during = load.mark()
            load.wait_answers(16, since=during)
            after = load.mark()
            assert processes.health_status(gateway.address) == NOT_SERVING, (
                "the drain delay ended before the measurement did (machine too slow for this test)"
            )
            assert load.codes(during, after) == {"OK": after - during}
        assert gateway.process.wait(60) == 0
        load.stop()
        codes = load.codes()
        # A call that reaches the port in the instant the server stops is cancelled by gRPC itself before the
        # gateway sees it (a drain delay is what keeps traffic away from that instant): never an accepted one.
        assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, codes
        cancelled = [a.request_id for a in load.answers if a.code == "CANCELLED"]
        assert not any(f'"request_id":"{rid}"' in gateway.log_text() for rid in cancelled)
        logged = _gateway_log_codes(gateway)
        assert set(logged) <= {"OK", "UNAVAILABLE/shutting_down"}, f"accepted requests failed: {logged}"
        assert logged.get("OK", 0) == codes["OK"], "each OK the clients got is one request the gateway logged"
        assert load.integrity()["lost"] == 0 and load.integrity()["mismatched"] == 0
        _report(f"gateway SIGTERM, drain delay {drain_delay} s", load, gateway_log=logged)
    finally:
        load.stop()
        gateway.kill()


def test_kill_9_under_load_then_recovery(trained_repository: Path, image: bytes, tmp_path: Path):
    """kill -9 of inference under load: callers get UNAVAILABLE (no hang, no other code), the gateway survives,
    and serves again once inference is back on its port; every request got exactly one answer."""
    port = processes.free_port()
    inference = processes.start_inference(trained_repository, tmp_path / "i1", port=port, extra=EXPLICIT)
    gateway = processes.start_gateway(f"dns:///localhost:{port}", tmp_path / "gateway")
    processes.wait_ready(gateway.address)
    load = ClassifyLoad(gateway.address, image, clients=8, model_name=MODEL).start()
    try:
        load.wait_answers(16, code="OK")
        inference.kill()
        killed = load.mark()
        load.wait_answers(16, since=killed, code="UNAVAILABLE")
        inference = processes.start_inference(trained_repository, tmp_path / "i2", port=port, extra=EXPLICIT)
        back = load.mark()
        load.wait_answers(16, since=back, code="OK")
        load.stop()
        assert set(load.codes()) <= {"OK", "UNAVAILABLE"}, load.codes()
        assert load.integrity() == {**load.integrity(), "lost": 0, "duplicated": 0, "mismatched": 0}
        assert gateway.alive()
        _report("inference kill -9 and restart", load)
    finally:
        load.stop()
        inference.kill()
        gateway.kill()


def test_hung_inference_fails_fast_and_recovers(trained_repository: Path, image: bytes, tmp_path: Path):
    """A SIGSTOPped inference process: once the gateway's readiness checks time out it answers UNAVAILABLE at once
    (not DEADLINE_EXCEEDED at the end of a 60 s deadline), in-flight calls included; SIGCONT: it serves again."""
    inference = processes.start_inference(trained_repository, tmp_path / "inference", extra=EXPLICIT)
    gateway = processes.start_gateway(inference.address, tmp_path / "gateway", extra=["--request-timeout", "60"])
    processes.wait_ready(gateway.address)
    load = ClassifyLoad(gateway.address, image, clients=4, model_name=MODEL, timeout_s=60).start()
    try:
        load.wait_answers(8, code="OK")
        inference.process.send_signal(signal.SIGSTOP)
        stopped = load.mark()
        load.wait_answers(8, since=stopped, code="UNAVAILABLE", timeout=50)
        assert processes.health_status(gateway.address) == NOT_SERVING
        inference.process.send_signal(signal.SIGCONT)
        resumed = load.mark()
        load.wait_answers(8, since=resumed, code="OK")
        load.stop()
        assert "DEADLINE_EXCEEDED" not in load.codes(), load.codes()
        assert load.integrity()["lost"] == 0
        _report("inference SIGSTOP / SIGCONT", load)
    finally:
        load.stop()
        inference.process.send_signal(signal.SIGCONT)
        inference.kill()
        gateway.kill()


def _pending(service: processes.Service) -> float:
    return sum(
        float(line.split()[-1])
        for line in service.metrics_text().splitlines()
        if line.startswith("cxr_inference_pending_requests{")
    )


def test_upstream_cancelled_is_retried_on_another_replica(trained_repository: Path, image: bytes, tmp_path: Path):
    """A replica stopping with requests still queued cancels them (its grace period runs out): the gateway answers
    none of them CANCELLED (which a caller reads as its own doing) but retries each on the other replica."""
    import shutil

    slow = tmp_path / "slow-repository"
    shutil.copytree(trained_repository / MODEL, slow / MODEL)
    config = slow / MODEL / "config.pbtxt"
    config.write_text(with_queue_delay(config.read_text(), 20_000_000))
    stopping = processes.start_inference(slow, tmp_path / "a", extra=[*EXPLICIT, "--grace-period", "0.5"])
    staying = processes.start_inference(trained_repository, tmp_path / "b", extra=EXPLICIT)
    gateway = processes.start_gateway(
        f"ipv4:{stopping.address},{staying.address}", tmp_path / "gateway", extra=["--request-timeout", "60"]
    )
    processes.wait_ready(gateway.address)
    load = ClassifyLoad(gateway.address, image, clients=4, model_name=MODEL, timeout_s=60).start()
    try:
        _wait(lambda: _pending(stopping) >= 1, "a request queued on the slow replica")
        stopping.process.send_signal(signal.SIGTERM)
        assert stopping.process.wait(60) == 0
        exited = load.mark()
        load.wait_answers(8, since=exited, code="OK")
        load.stop()
        assert re.search(r"grace period of 0.5 s ran out with [1-9]\d* requests still running", stopping.log_text())
        assert load.codes() == {"OK": len(load.answers)}, load.codes()
        retries = [
            float(line.split()[-1])
            for line in gateway.metrics_text().splitlines()
            if line.startswith("cxr_gateway_upstream_retries_total ")
        ]
        assert retries and retries[0] >= 1
        _report("upstream CANCELLED retried", load, gateway_retries=retries[0])
    finally:
        load.stop()
        for service in (gateway, stopping, staying):
            service.kill()
