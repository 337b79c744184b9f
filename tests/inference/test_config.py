"""Settings come from CXR_INFERENCE_* variables, flags override them, and the CLI module stays light."""

from __future__ import annotations

import argparse
import subprocess
import sys

from conftest import ROOT
from services.inference import cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_environment_then_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_INFERENCE_PORT", "9001")
    monkeypatch.setenv("CXR_INFERENCE_METRICS_PORT", "9002")
    monkeypatch.setenv("CXR_INFERENCE_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    monkeypatch.setenv("CXR_INFERENCE_MODEL_CONTROL", "explicit")
    settings = cli.settings_from_args(parse("--repository", str(tmp_path), "--port", "7001", "--load-model", "a",
                                            "--load-model", "b", "--no-warmup"))
    assert settings.port == 7001, "a flag overrides the environment"
    assert settings.metrics_port == 9002
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.model_control == "explicit" and settings.load_models == ["a", "b"]
    assert settings.repository == tmp_path and settings.warmup is False


def test_every_setting_is_documented():
    from services.inference.config import InferenceSettings

    for name, field in InferenceSettings.model_fields.items():
        assert field.description, f"InferenceSettings.{name} has no docstring"


def test_the_cli_and_the_server_import_no_torch_and_the_cli_no_onnxruntime():
    code = ("import sys, services.inference.cli; heavy = {'onnxruntime', 'torch', 'grpc'} & set(sys.modules); "
            "assert not heavy, heavy; import services.inference.server; assert 'torch' not in sys.modules; "
            "assert 'training' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
