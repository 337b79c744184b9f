"""Start and stop real `cxr serve inference` subprocesses on free loopback ports (for the tests and the bench).

Imports nothing of our generated protobuf code, so it is usable next to tritonclient.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_START_TIMEOUT_S = 180


@dataclass
class ServerProcess:
    """A running `cxr serve inference` subprocess."""

    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def start_server(repository: Path, workdir: Path, *args: str, env: dict | None = None) -> ServerProcess:
    """Start `python -m cxr serve inference` on free ports; return once it reports ready (all models warmed up)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "ports"
    port_file.unlink(missing_ok=True)
    log_path = workdir / "server.log"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CXR_INFERENCE_INTRA_OP_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "cxr", "serve", "inference", "--repository", str(repository), "--host",
               "127.0.0.1", "--port", "0", "--metrics-port", "0", "--port-file", str(port_file), *args]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    end = time.monotonic() + SERVER_START_TIMEOUT_S
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"inference server exited with {proc.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"inference server not ready after {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()}")
        time.sleep(0.1)
    grpc_port, metrics_port = (int(p) for p in port_file.read_text().split())
    return ServerProcess(proc, grpc_port, metrics_port, log_path)
