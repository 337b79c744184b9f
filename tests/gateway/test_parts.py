"""The gateway's small parts on their own: settings and flags, heatmap rendering."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys

import numpy as np
from PIL import Image

from services.common.cli import settings_from_args
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
    settings = settings_from_args(GatewaySettings, parser.parse_args(["--inference", "infer:9001", "--port", "7000"]))
    assert (settings.inference, settings.port, settings.default_model) == ("infer:9001", 7000, "mobilenet")
    assert settings_from_args(GatewaySettings, parser.parse_args([])).port == 6000


def test_every_flag_the_readme_tests_and_deploy_files_use_still_parses(tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    paths = {
        flag: str(tmp_path / flag)
        for flag in (
            "tls-cert",
            "tls-key",
            "tls-client-ca",
            "auth-token-file",
            "upstream-ca",
            "upstream-cert",
            "upstream-key",
            "model-repository",
        )
    }
    argv = [
        "--inference",
        "dns:///inference:8001",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--default-model",
        "mobilenet",
        "--max-image-bytes",
        "1000",
        "--max-image-pixels",
        "2000",
        "--decode-workers",
        "3",
        "--decode-processes",
        "1",
        "--request-timeout",
        "5",
        "--lb-policy",
        "pick_first",
        "--log-level",
        "DEBUG",
        "--port-file",
        str(tmp_path / "ports"),
        "--upstream-tls",
    ]
    for flag, path in paths.items():
        argv += [f"--{flag}", path]
    args = parser.parse_args(argv)
    settings = settings_from_args(GatewaySettings, args)
    assert (settings.inference, settings.port, settings.max_image_bytes, settings.request_timeout_s) == (
        "dns:///inference:8001",
        0,
        1000,
        5.0,
    )
    assert settings.upstream_tls is True and settings.lb_policy == "pick_first" and settings.decode_processes == 1
    assert (
        str(settings.tls_client_ca) == paths["tls-client-ca"]
        and str(settings.model_repository) == paths["model-repository"]
    )
    for secret in ("--upstream-token", "--auth-tokens"):
        assert secret not in parser.format_help(), "tokens come from the environment only (a flag shows in ps)"


def test_serve_cli_imports_nothing_heavy():
    code = (
        "import sys, services.gateway.cli, services.gateway.cli_classify; "
        "print(sorted(m for m in ('torch', 'training', 'grpc', 'numpy', 'pydicom', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_heatmap_overlay():
    pixels = np.tile(np.arange(256, dtype=np.uint8), (300, 4))  # 300 x 1024
    cam = np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32)
    image = Image.open(io.BytesIO(overlay_png(pixels, cam)))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (512, 150)
    rgb = np.asarray(image).astype(int)
    # low activation (top left) is blue-ish, high activation (bottom right) red-ish
    assert rgb[5, 5, 2] > rgb[5, 5, 0] and rgb[-5, -5, 0] > rgb[-5, -5, 2]
    assert normalise(np.ones((2, 2))).max() == 0.0
