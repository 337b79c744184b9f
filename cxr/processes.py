"""Start a `cxr serve inference|gateway` child process and wait until it listens: the one launcher that
`cxr demo-stack`, the tests and the benchmarks share.

The child is told `--port-file F` and writes "GRPC_PORT METRICS_PORT HTTP_PORT" there once it serves (`--port 0` picks
free ports), so nobody polls a port or guesses a sleep. Imports nothing of ours (usable beside tritonclient).
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

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServiceProcess:
    """A running `cxr serve NAME` child: its process, bound ports and log file."""

    name: str
    process: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    http_port: int = -1  # the HTTP/REST port (-1: off)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the services drain, then exit), then SIGKILL if it does not exit in time."""
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


def start_service(
    name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None, timeout: float = 300.0
) -> ServiceProcess:
    """Run `python -m cxr serve NAME ARGV... --port-file F`; return once F names its ports (models warmed up).

    `env` is added to this process's environment. On failure the child is killed and the error quotes its log.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"{name}.ports"
    port_file.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cxr", "serve", name, *argv, "--port-file", str(port_file)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if process.poll() is not None:
            raise RuntimeError(f"`cxr serve {name}` exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(
                f"`cxr serve {name}` did not start within {timeout:.0f} s:\n{log_path.read_text()[-4000:]}"
            )
        time.sleep(0.1)
    port, metrics_port, *more = (int(v) for v in port_file.read_text().split())
    return ServiceProcess(name, process, port, metrics_port, log_path, http_port=more[0] if more else -1)
