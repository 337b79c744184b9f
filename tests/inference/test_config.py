"""Settings come from CXR_INFERENCE_* variables, flags override them, and the CLI module stays light."""

from __future__ import annotations

import argparse
import subprocess
import sys

from conftest import ROOT
from services.common.cli import settings_from_args
from services.inference import cli
from services.inference.config import InferenceSettings


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_environment_then_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_INFERENCE_PORT", "9001")
    monkeypatch.setenv("CXR_INFERENCE_METRICS_PORT", "9002")
    monkeypatch.setenv("CXR_INFERENCE_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    monkeypatch.setenv("CXR_INFERENCE_MODEL_CONTROL", "explicit")
    settings = settings_from_args(
        InferenceSettings,
        parse("--repository", str(tmp_path), "--port", "7001", "--load-model", "a", "--load-model", "b", "--no-warmup"),
    )
    assert settings.port == 7001, "a flag overrides the environment"
    assert settings.metrics_port == 9002
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.model_control == "explicit" and settings.load_models == ["a", "b"]
    assert settings.repository == tmp_path and settings.warmup is False


def test_every_flag_the_readme_tests_and_deploy_files_use_still_parses(tmp_path):
    args = parse(
        "--repository",
        str(tmp_path),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "-1",
        "--model-control",
        "explicit",
        "--load-model",
        "a",
        "--providers",
        "CPUExecutionProvider",
        "--intra-op-threads",
        "1",
        "--inter-op-threads",
        "2",
        "--graph-optimization",
        "basic",
        "--compute-threads",
        "3",
        "--grace-period",
        "2",
        "--drain-delay",
        "0.5",
        "--spin-wait",
        "--no-warmup",
        "--port-file",
        str(tmp_path / "ports"),
        "--log-level",
        "DEBUG",
    )
    settings = settings_from_args(InferenceSettings, args)
    assert (settings.port, settings.metrics_port, settings.intra_op_threads, settings.inter_op_threads) == (0, -1, 1, 2)
    assert (settings.graph_optimization, settings.compute_threads, settings.grace_period_s) == ("basic", 3, 2.0)
    assert (settings.drain_delay_s, settings.spin_wait, settings.warmup, settings.log_level) == (
        0.5,
        True,
        False,
        "DEBUG",
    )
    assert args.port_file == str(tmp_path / "ports")


def test_every_setting_is_documented():
    from services.inference.config import InferenceSettings

    for name, field in InferenceSettings.model_fields.items():
        assert field.description, f"InferenceSettings.{name} has no docstring"


def test_the_cli_and_the_server_import_no_torch_and_the_cli_no_onnxruntime():
    code = (
        "import sys, services.inference.cli; heavy = {'onnxruntime', 'torch', 'grpc'} & set(sys.modules); "
        "assert not heavy, heavy; import services.inference.server; assert 'torch' not in sys.modules; "
        "assert 'training' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
