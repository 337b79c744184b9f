"""The gateway's small parts on their own: settings and flags, PHI-safe log lines, heatmap rendering."""

from __future__ import annotations

import argparse
import io
import json
import logging
import subprocess
import sys

import numpy as np
from PIL import Image

from services.common import logging as cxr_logging
from services.gateway import cli
from services.gateway.config import GatewaySettings
from services.gateway.heatmap import normalise, overlay_png


def test_every_setting_is_documented():
    for name, info in GatewaySettings.model_fields.items():
        assert info.description, f"{name} needs a one-line docstring"


def test_environment_then_flags(monkeypatch):
    monkeypatch.setenv("CXR_GATEWAY_PORT", "6000")
    monkeypatch.setenv("CXR_GATEWAY_DEFAULT_MODEL", "mobilenet")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    settings = cli.settings_from(parser.parse_args(["--inference", "infer:9001", "--port", "7000"]))
    assert (settings.inference, settings.port, settings.default_model) == ("infer:9001", 7000, "mobilenet")
    assert cli.settings_from(parser.parse_args([])).port == 6000


def test_serve_cli_imports_nothing_heavy():
    code = ("import sys, services.gateway.cli, services.gateway.cli_classify; "
            "print(sorted(m for m in ('torch', 'training', 'grpc', 'numpy', 'pydicom', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_request_log_is_one_json_line_with_allowed_fields_only():
    stream = io.StringIO()
    cxr_logging.configure("INFO", stream=stream)
    try:
        cxr_logging.log_request(
            logging.getLogger("cxr.gateway"), request_id="req 1\ninjected", model="ensemble", code="OK", total_ms=12.5,
            patient_name="Doe^Jane", accession_number="A123", pixels=np.zeros(3),
        )
    finally:
        cxr_logging.configure("INFO")  # back to stderr
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["request_id"] == "req_1_injected" and record["model"] == "ensemble" and record["total_ms"] == 12.5
    assert not {"patient_name", "accession_number", "pixels"} & set(record)
    assert "Doe" not in lines[0] and "A123" not in lines[0]


def test_request_id_is_bounded():
    assert len(cxr_logging.safe_request_id("x" * 1000)) == cxr_logging.MAX_REQUEST_ID


def test_heatmap_overlay():
    pixels = np.tile(np.arange(256, dtype=np.uint8), (300, 4))  # 300 x 1024
    cam = np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32)
    image = Image.open(io.BytesIO(overlay_png(pixels, cam)))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (512, 150)
    rgb = np.asarray(image).astype(int)
    # low activation (top left) is blue-ish, high activation (bottom right) red-ish
    assert rgb[5, 5, 2] > rgb[5, 5, 0] and rgb[-5, -5, 0] > rgb[-5, -5, 2]
    assert normalise(np.ones((2, 2))).max() == 0.0
