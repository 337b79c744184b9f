"""services/common/cli.py: flags generated from a settings class (help from docstrings, defaults and env shown by the
helper), flags over env over defaults, and the port file, on a settings class of its own (the helper is generic)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.common.cli import add_port_file_argument, add_settings_arguments, run_service, settings_from_args


class DemoSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_DEMO_", use_attribute_docstrings=True, extra="ignore")

    port: int = 104
    """Port to listen on; 0 picks a free one."""
    ratio: float = 0.5
    """A share of 100% of something."""
    mode: Literal["store", "forward"] = "store"
    """What to do with what arrives."""
    peers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Peers to forward to."""
    spool: Path | None = None
    """Folder for what is not yet sent."""
    verify: bool = True
    """Check what arrives."""
    timeout_s: float = 30.0
    """How long one transfer may take."""
    secret: str = ""
    """Never a flag."""


def _parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, DemoSettings, **kwargs)
    add_port_file_argument(parser)
    return parser


def test_one_flag_per_field_with_its_docstring_default_and_environment_variable():
    text = " ".join(_parser(flags={"peers": "--peer"}, exclude=["secret"]).format_help().split())
    for flag in (
        "--port PORT",
        "--ratio RATIO",
        "--mode {store,forward}",
        "--peer A[,B...]",
        "--spool SPOOL",
        "--verify, --no-verify",
        "--timeout SECONDS",
        "--port-file",
    ):
        assert flag in text, flag
    assert "Port to listen on; 0 picks a free one. [default: 104; env CXR_DEMO_PORT]" in text
    assert "A share of 100% of something." in text
    assert "How long one transfer may take. (seconds) [default: 30.0; env CXR_DEMO_TIMEOUT_S]" in text
    assert "--secret" not in text and "--peers" not in text


def test_flags_override_the_environment_which_overrides_the_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_DEMO_PORT", "11112")
    monkeypatch.setenv("CXR_DEMO_MODE", "forward")
    monkeypatch.setenv("CXR_DEMO_SECRET", "from-env")
    parser = _parser(exclude=["secret"])
    settings = settings_from_args(DemoSettings, parser.parse_args([]))
    assert (settings.port, settings.mode, settings.secret, settings.verify) == (11112, "forward", "from-env", True)
    args = parser.parse_args(
        [
            "--port",
            "0",
            "--peers",
            "a,b",
            "--peers",
            "c",
            "--no-verify",
            "--timeout",
            "2.5",
            "--spool",
            str(tmp_path),
            "--mode",
            "store",
        ]
    )
    settings = settings_from_args(DemoSettings, args)
    assert (settings.port, settings.peers, settings.verify, settings.timeout_s) == (0, ["a", "b", "c"], False, 2.5)
    assert (settings.spool, settings.mode) == (tmp_path, "store")
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "delete"])


def test_a_field_type_without_a_flag_rule_is_refused_at_once():
    class Odd(BaseSettings):
        mapping: dict[str, int] = Field(default_factory=dict)
        """No flag form."""

    with pytest.raises(TypeError, match="no flag for type"):
        add_settings_arguments(argparse.ArgumentParser(), Odd)
    add_settings_arguments(argparse.ArgumentParser(), Odd, exclude=["mapping"])


def test_run_service_writes_the_ports_the_service_reports(tmp_path):
    port_file = tmp_path / "ports"
    seen = {}

    async def serve(settings, *, started: asyncio.Future) -> None:
        assert not port_file.exists(), "the port file appears only once the service reports its ports"
        started.set_result((40001, 40002))
        await asyncio.sleep(0)
        seen["ports"] = port_file.read_text()

    assert run_service(serve, DemoSettings(), str(port_file)) == 0
    assert seen["ports"] == "40001 40002\n"
    assert not (tmp_path / "ports.tmp").exists()
