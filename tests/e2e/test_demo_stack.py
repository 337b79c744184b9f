"""`make run` is `cxr demo-stack`: on a machine without data it must generate phantoms, train, export, serve and
answer a classification through the gateway. Run here with --once on free ports and a tiny model."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
def test_demo_stack_trains_serves_and_classifies_on_a_fresh_machine(tmp_path):
    inf, inf_m, gw, gw_m, inf_h, gw_h = _free_ports(6)
    repo = tmp_path / "repo"
    cmd = [
        sys.executable,
        "-m",
        "cxr",
        "demo-stack",
        "--synthetic",
        "--once",
        "--work",
        str(tmp_path / "work"),
        "--repository",
        str(repo),
        "--epochs",
        "1",
        "--image-size",
        "64",
        "--inference-port",
        str(inf),
        "--inference-metrics-port",
        str(inf_m),
        "--gateway-port",
        str(gw),
        "--gateway-metrics-port",
        str(gw_m),
        "--inference-http-port",
        str(inf_h),
        "--gateway-http-port",
        str(gw_h),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert (repo / "custom_cnn" / "1" / "model.onnx").is_file()
    # the classify table names the model and version, and the answer carries the demo and clinical-use notices
    assert "custom_cnn  1" in out, out[-4000:]
    assert "synthetic demo model" in out
    assert "not for clinical use" in out
    # both services were stopped: nothing listens on the gateway port any more
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", gw)) != 0
