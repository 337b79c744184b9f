"""Decoding in worker processes (`--decode-processes`): the same answers, refusals that survive the trip between
processes, and a worker that dies mid-flight (as a decoder crash on a hostile file would kill it) costs one
refused request, not the gateway."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import numpy as np

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.generated.cxr.v1 import gateway_pb2_grpc
from cxr.imaging import load_for_model
from cxr.repository import read_config
from tests.cxr import corpus
from tests.gateway import processes


def _decoder_workers(parent: int) -> list[int]:
    """Worker processes of the gateway's decode pool (multiprocessing spawn children, not its resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


def test_decoding_in_worker_processes(
    inference_service, dicom_dir: Path, cxr_raw_dir: Path, trained_repository: Path, onnx_reference, tmp_path: Path
):
    gateway = processes.start_gateway(inference_service.address, tmp_path, extra=["--decode-processes", "2"])
    channel = grpc.insecure_channel(gateway.address)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    size = int(read_config(trained_repository / "custom_cnn").parameters["cxr.image_size"].string_value)
    try:
        processes.wait_ready(gateway.address)
        assert len(_decoder_workers(gateway.process.pid)) == 2  # started (and warmed up) before serving
        for path in sorted(dicom_dir.rglob("*.dcm")):
            response = stub.Classify(pb.ClassifyRequest(image=path.read_bytes(), model_name="custom_cnn"), timeout=60)
            reference = onnx_reference.run("custom_cnn", response.model_version, load_for_model(path, size))[
                "probabilities"
            ]
            np.testing.assert_allclose([c.probability for c in response.classes], reference, atol=1e-5)
        rgb = next(c for c in corpus.build(dicom_dir, cxr_raw_dir) if c.name == "dicom_rgb")
        try:
            stub.Classify(pb.ClassifyRequest(image=rgb.data), timeout=60)
            raise AssertionError("an RGB DICOM was accepted")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "(not_grayscale)" in exc.details()

        for pid in _decoder_workers(gateway.process.pid):
            os.kill(pid, signal.SIGKILL)  # what a segfault in a decoder library would do
        data = (dicom_dir / "CR-MONO1-10-chest.dcm").read_bytes()
        outcomes = []
        for _ in range(3):
            try:
                stub.Classify(pb.ClassifyRequest(image=data, model_name="custom_cnn"), timeout=60)
                outcomes.append("OK")
                break
            except grpc.RpcError as exc:
                outcomes.append(f"{exc.code().name} {exc.details()}")
        assert outcomes[-1] == "OK", outcomes
        assert all(o == "OK" or (o.startswith("INVALID_ARGUMENT") and "(decoder_crashed)" in o) for o in outcomes), (
            outcomes
        )
        assert gateway.alive() and "a decoder worker died" in gateway.log_text()
    finally:
        channel.close()
        gateway.stop()
