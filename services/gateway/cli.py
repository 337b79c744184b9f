"""`cxr serve gateway --inference HOST:PORT [--port 50051] [--metrics-port 9090] ...`

One flag per GatewaySettings field (services/common/cli.py); flags override CXR_GATEWAY_* environment variables,
which override the defaults in config.py. Tokens are environment-only (a flag would show them in `ps`).
Only light imports here: the server and its dependencies load inside run().
"""

from __future__ import annotations

import argparse

from services.common.cli import add_port_file_argument, add_settings_arguments, run_service, settings_from_args
from services.gateway.config import GatewaySettings

SECRETS = ("upstream_token", "auth_tokens")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, GatewaySettings, exclude=SECRETS)
    add_port_file_argument(parser)


def run(args: argparse.Namespace) -> int:
    from services.gateway.server import serve

    return run_service(serve, settings_from_args(GatewaySettings, args), args.port_file)
