"""`cxr classify` end to end: table, JSON, heatmap files, errors with the server's message, and a gateway that
requires mutual TLS and a bearer token in front of the real inference service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cxr.imaging import load_for_model
from cxr.repository import read_config
from tests.gateway import certs, processes

ROOT = Path(__file__).resolve().parents[2]


def _cxr(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "cxr", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_classify_json_matches_onnxruntime(
    gateway_service, dicom_dir: Path, cxr_raw_dir: Path, trained_repository: Path, onnx_reference
):
    files = [dicom_dir / "RG1_J2KI.dcm", sorted((cxr_raw_dir / "Viral Pneumonia").glob("*.png"))[0]]
    result = _cxr("classify", "--server", gateway_service.address, "--model", "resnet50", "--json", *map(str, files))
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    size = int(read_config(trained_repository / "resnet50").parameters["cxr.image_size"].string_value)
    assert [a["file"] for a in answers] == [str(f) for f in files]
    for path, answer in zip(files, answers):
        reference = onnx_reference.run("resnet50", answer["model_version"], load_for_model(path, size))["probabilities"]
        got = [c["probability"] for c in answer["classes"]]
        np.testing.assert_allclose(got, reference, atol=1e-5)
        assert any(n.startswith("not for clinical use") for n in answer["notices"])
    # the DICOM's own UIDs were sent along and came back untouched
    assert answers[0]["identifiers"]["sop_instance_uid"].startswith("1.")


def test_classify_table_and_heatmaps(gateway_service, dicom_dir: Path, tmp_path: Path):
    files = [dicom_dir / "CR-MONO1-10-chest.dcm", dicom_dir / "Fake_MONOHR1.dcm"]
    out = tmp_path / "heat.png"
    result = _cxr("classify", "--server", gateway_service.address, "--heatmap", str(out), *map(str, files))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["file", "model", "version", "answer", "top"] and "Normal" in lines[0]
    assert "ood score" in lines[0]  # the input gate's score (and its threshold) of each file
    assert all("(gate 1.00)" in line for line in lines[1:3])
    assert lines[1].startswith("CR-MONO1-10-chest.dcm") and lines[2].startswith("Fake_MONOHR1.dcm")
    assert "note: MONOCHROME1 inverted" in result.stdout and "not for clinical use" in result.stdout
    for source in files:
        heatmap = tmp_path / f"heat-{source.stem}.png"
        assert Image.open(heatmap).format == "PNG"


def test_classify_errors_exit_non_zero_with_the_servers_message(gateway_service, dicom_dir: Path, tmp_path: Path):
    truncated = tmp_path / "truncated.dcm"
    data = (dicom_dir / "RG1_J2KI.dcm").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    good = dicom_dir / "CR-MONO1-10-chest.dcm"
    result = _cxr("classify", "--server", gateway_service.address, str(good), str(truncated))
    assert result.returncode == 1
    assert "truncated.dcm: INVALID_ARGUMENT: image refused (truncated)" in result.stderr
    assert "CR-MONO1-10-chest.dcm" in result.stdout  # the good file is still reported
    result = _cxr("classify", "--server", gateway_service.address, "--model", "no_such_model", str(good))
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr and "no_such_model" in result.stderr
    result = _cxr("classify", "--server", f"127.0.0.1:{processes.free_port()}", "--timeout", "5", str(good))
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


def test_mtls_and_token_end_to_end(inference_service, dicom_dir: Path, tmp_path: Path):
    pki = certs.make_pki(tmp_path / "pki")
    token = "s3cret-token-for-this-test"
    gateway = processes.start_gateway(
        inference_service.address,
        tmp_path / "gateway",
        extra=["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)],
        env={"CXR_GATEWAY_AUTH_TOKENS": token},
    )
    try:
        path = str(dicom_dir / "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
        tls = ["--ca", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key)]
        ok = _cxr("classify", "--server", gateway.address, *tls, "--json", path, env={"CXR_TOKEN": token})
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)[0]["top_class"]
        no_token = _cxr("classify", "--server", gateway.address, *tls, path, env={"CXR_TOKEN": ""})
        assert no_token.returncode == 1 and "UNAUTHENTICATED" in no_token.stderr
        no_cert = _cxr(
            "classify", "--server", gateway.address, "--ca", str(pki.ca), "--token", token, "--timeout", "10", path
        )
        assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr
    finally:
        gateway.stop()
