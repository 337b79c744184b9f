"""Start a real `cxr serve inference` subprocess on free loopback ports for the tests (launcher: `cxr.processes`).

Imports nothing of our generated protobuf code, so it is usable next to tritonclient.
"""

from __future__ import annotations

import re
from pathlib import Path

from cxr.processes import ServiceProcess, start_service

ServerProcess = ServiceProcess
SERVER_START_TIMEOUT_S = 180


def start_server(repository: Path, workdir: Path, *args: str, env: dict | None = None) -> ServerProcess:
    """Start `cxr serve inference` on free ports, one onnxruntime thread; return once ready (all models warmed up)."""
    return start_service(
        "inference",
        [
            "--repository",
            str(repository),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            *args,
        ],
        workdir,
        env={"OMP_NUM_THREADS": "1", "CXR_INFERENCE_INTRA_OP_THREADS": "1", **(env or {})},
        timeout=SERVER_START_TIMEOUT_S,
    )


def with_queue_delay(config_text: str, delay_us: int) -> str:
    """config.pbtxt text for checks that need requests to sit in the queue: one instance (the exported shape may have
    more, and a free instance takes its share at once), a longer batching delay, and that delay waited by a request
    alone too (cxr.hold_lone_requests, Triton's behaviour; by default a lone request runs at once)."""
    config_text = config_text.replace("max_queue_delay_microseconds: 500", f"max_queue_delay_microseconds: {delay_us}")
    config_text = re.sub(r"instance_group \{\n  count: \d+", "instance_group {\n  count: 1", config_text)
    assert "instance_group {\n  count: 1" in config_text, config_text
    return config_text + 'parameters {\n  key: "cxr.hold_lone_requests"\n  value {\n    string_value: "true"\n  }\n}\n'
