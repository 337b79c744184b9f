"""`cxr serve inference`: one flag per InferenceSettings field (services/common/cli.py); flags override
CXR_INFERENCE_* environment variables. Heavy imports happen in run()."""

from __future__ import annotations

import argparse

from services.common.cli import add_port_file_argument, add_settings_arguments, run_service, settings_from_args
from services.inference.config import InferenceSettings

FLAGS = {"load_models": "--load-model"}  # repeatable, one model each (or comma-separated)
SECRETS = ("auth_tokens",)  # environment only: a flag would show the tokens in `ps`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, InferenceSettings, flags=FLAGS, exclude=SECRETS)
    add_port_file_argument(parser)


def run(args: argparse.Namespace) -> int:
    from services.inference.server import serve

    return run_service(serve, settings_from_args(InferenceSettings, args), args.port_file)
