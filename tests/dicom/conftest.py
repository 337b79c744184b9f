"""The PACS round trip on loopback, all real: `cxr serve inference` over the trained test repository,
`cxr serve gateway` in front of it, a real Orthanc (tests/dicom/orthanc.py) that knows our node as modality
"cxr", and `cxr serve dicom` between them. Module-scoped where a test changes nothing the others see."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from conftest import require
from cxr.generated.cxr.v1 import gateway_pb2_grpc
from cxr.processes import ServiceProcess
from tests.dicom import orthanc
from tests.gateway import processes

NODE_AE = "CXR"


@pytest.fixture(scope="session")
def pacs_available() -> None:
    """Checked before `trained_repository` (minutes of training) is built, so a machine without Orthanc skips fast."""
    require(orthanc.missing() is None, orthanc.missing() or "")


@pytest.fixture(scope="session")
def dicom_inference(pacs_available, trained_repository: Path, tmp_path_factory):
    inference = processes.start_inference(trained_repository, tmp_path_factory.mktemp("dicom-inference"))
    yield inference
    inference.stop()


@pytest.fixture(scope="session")
def dicom_gateway(dicom_inference, trained_repository: Path, tmp_path_factory):
    gateway = processes.start_gateway(
        dicom_inference.address,
        tmp_path_factory.mktemp("dicom-gateway"),
        extra=["--model-repository", str(trained_repository)],
    )
    processes.wait_ready(gateway.address)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="session")
def gateway_stub(dicom_gateway):
    channel = grpc.insecure_channel(dicom_gateway.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    yield gateway_pb2_grpc.GatewayStub(channel)
    channel.close()


@pytest.fixture(scope="session")
def node_port() -> int:
    return orthanc.free_port()


@pytest.fixture(scope="session")
def pacs(pacs_available, node_port: int, tmp_path_factory):
    """Orthanc, with our node (AE CXR) as its modality "cxr"."""
    server = orthanc.Orthanc.start(tmp_path_factory.mktemp("orthanc"), {"cxr": (NODE_AE, "127.0.0.1", node_port)})
    yield server
    server.stop()


def start_node(
    gateway: str,
    workdir: Path,
    destinations: list[str],
    *,
    port: int = 0,
    dicomweb: str = "",
    extra: list[str] | None = None,
) -> ServiceProcess:
    argv = [
        "--gateway",
        gateway,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ae-title",
        NODE_AE,
        "--spool",
        str(workdir / "spool"),
        "--metrics-port",
        str(orthanc.free_port()),
        "--retry-backoff",
        "0.2",
        "--retry-backoff-max",
        "2",
        *(extra or []),
    ]
    if destinations:
        argv += [arg for d in destinations for arg in ("--destination", d)]
    if dicomweb:
        argv += ["--dicomweb", dicomweb]
    return processes.start("dicom", argv, workdir, timeout=60)


@pytest.fixture(scope="module")
def node(dicom_gateway, pacs, node_port: int, tmp_path_factory):
    """The node as Orthanc knows it: accepts only Orthanc's AE title, sends results back to Orthanc by C-STORE."""
    service = start_node(
        dicom_gateway.address,
        tmp_path_factory.mktemp("node"),
        [pacs.destination],
        port=node_port,
        extra=["--allow-ae", orthanc.AE_TITLE],
    )
    yield service
    assert service.stop() == 0, "the node must shut down cleanly on SIGTERM"


def metric(service: ServiceProcess, name: str, **labels) -> float:
    """The value of one sample of a service's /metrics (0 when it has none yet)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        metric_name, _, label_text = sample.partition("{")
        if metric_name != name:
            continue
        found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if found == want:
            return float(value)
    return 0.0


def wait_for(condition, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
