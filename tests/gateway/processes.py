"""Start the real services as subprocesses on loopback (as `cxr serve ...` runs them) and stop them again.

The launching itself is `cxr.processes` (shared with `cxr demo-stack` and the benchmarks); this adds the
tests' defaults and health checks. Each process's JSON log lines go to a file the tests can read.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc

from cxr.processes import ServiceProcess, start_service

Service = ServiceProcess  # what the tests call a running child


def free_port() -> int:
    """A port nothing listens on now, for a test about an absent listener (a dead upstream). A service of ours
    takes `--port 0` instead and reports the port it bound in its port file: no race with other processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None, timeout: float = 120.0
) -> Service:
    """`cxr serve NAME ARGV...` with each process's math libraries kept to one thread (2-core machines)."""
    return start_service(name, argv, workdir, env={"OMP_NUM_THREADS": "1", **(env or {})}, timeout=timeout)


def start_inference(
    repository: Path, workdir: Path, port: int = 0, extra: list[str] | None = None, metrics_port: int | None = None
) -> Service:
    service = start(
        "inference",
        [
            "--repository",
            str(repository),
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port or 0),
            "--http-port",
            "0",
            "--host",
            "127.0.0.1",
            "--intra-op-threads",
            "1",
            "--grace-period",
            "2",
            *(extra or []),
        ],
        workdir,
    )
    wait_ready(service.address)
    return service


# The test repository's models (64 px, one epoch, thresholds fitted on 18 validation images) would refuse some real
# radiographs from other sources as out of distribution: test gateways answer those with a notice instead, unless a
# test asks for the default gate (`extra=["--gate-as-notice", ""]`, as tests/e2e/test_input_gate.py does).
TEST_GATE_AS_NOTICE = ["--gate-as-notice", "out_of_distribution"]


def start_gateway(
    inference: str, workdir: Path, extra: list[str] | None = None, env: dict[str, str] | None = None
) -> Service:
    return start(
        "gateway",
        [
            "--inference",
            inference,
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--host",
            "127.0.0.1",
            *TEST_GATE_AS_NOTICE,
            *(extra or []),
        ],
        workdir,
        env=env,
    )


def wait_ready(
    address: str, timeout: float = 120.0, credentials: grpc.ChannelCredentials | None = None, service: str = ""
) -> None:
    """Wait until grpc.health.v1 says SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                .status
            )
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = status
        except grpc.RpcError as exc:
            last = exc.code()
        finally:
            channel.close()
        time.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {timeout} s (last: {last})")


def health_status(address: str, credentials: grpc.ChannelCredentials | None = None) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    finally:
        channel.close()
