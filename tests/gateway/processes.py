"""Start the real services as subprocesses on loopback (as `cxr serve ...` runs them) and stop them again.

Each process writes its ports to a port file once listening (`--port 0` picks free ports) and its JSON log
lines to a file the tests can read.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful shutdown), then SIGKILL if it does not exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # 2-core machines: keep each process's math libraries to one or two threads
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None, timeout: float = 120.0) -> Service:
    """Run `python -m cxr serve NAME ARGV... --port-file F` and wait until F names its ports."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"{name}.ports"
    port_file.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    log = open(log_path, "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "cxr", "serve", name, *argv, "--port-file", str(port_file)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env(env),
    )
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists():
            port, metrics_port = (int(v) for v in port_file.read_text().split())
            return Service(name, process, port, metrics_port, log_path)
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{name} did not start within {timeout} s:\n{log_path.read_text()[-4000:]}")


def start_inference(repository: Path, workdir: Path, port: int = 0, extra: list[str] | None = None, metrics_port: int | None = None) -> Service:
    service = start(
        "inference",
        ["--repository", str(repository), "--port", str(port), "--metrics-port", str(metrics_port or free_port()), "--host", "127.0.0.1",
         "--intra-op-threads", "1", "--grace-period", "2", *(extra or [])],
        workdir,
    )
    wait_ready(service.address)
    return service


def start_gateway(inference: str, workdir: Path, extra: list[str] | None = None, env: dict[str, str] | None = None) -> Service:
    return start(
        "gateway",
        ["--inference", inference, "--port", "0", "--metrics-port", str(free_port()), "--host", "127.0.0.1", *(extra or [])],
        workdir, env=env,
    )


def wait_ready(address: str, timeout: float = 120.0, credentials: grpc.ChannelCredentials | None = None, service: str = "") -> None:
    """Wait until grpc.health.v1 says SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
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
