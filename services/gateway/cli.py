"""`cxr serve gateway --inference HOST:PORT [--port 50051] [--metrics-port 9090] ...`

Flags override CXR_GATEWAY_* environment variables, which override the defaults in config.py.
Only light imports here: the server and its dependencies load inside run().
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.gateway.config import GatewaySettings

# flag -> (settings field, type); help text comes from the field's docstring
FLAGS = {
    "--inference": ("inference", str),
    "--host": ("host", str),
    "--port": ("port", int),
    "--metrics-port": ("metrics_port", int),
    "--default-model": ("default_model", str),
    "--max-image-bytes": ("max_image_bytes", int),
    "--max-image-pixels": ("max_image_pixels", int),
    "--decode-workers": ("decode_workers", int),
    "--decode-processes": ("decode_processes", int),
    "--request-timeout": ("request_timeout_s", float),
    "--lb-policy": ("lb_policy", str),
    "--tls-cert": ("tls_cert", Path),
    "--tls-key": ("tls_key", Path),
    "--tls-client-ca": ("tls_client_ca", Path),
    "--auth-token-file": ("auth_token_file", Path),
    "--upstream-ca": ("upstream_ca", Path),
    "--upstream-cert": ("upstream_cert", Path),
    "--upstream-key": ("upstream_key", Path),
    "--gate-as-notice": ("gate_as_notice", str),
    "--model-repository": ("model_repository", Path),
    "--log-level": ("log_level", str),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, (name, kind) in FLAGS.items():
        info = GatewaySettings.model_fields[name]
        parser.add_argument(flag, dest=name, type=kind, default=None, help=f"{info.description} (default: {info.default})")
    parser.add_argument("--port-file", help="write 'GRPC_PORT METRICS_PORT' here once listening (for tests and scripts)")
    parser.add_argument("--upstream-tls", dest="upstream_tls", action="store_true", default=None, help=GatewaySettings.model_fields["upstream_tls"].description)


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    """Settings from the environment, with every flag given on the command line taking precedence."""
    names = [name for name, _ in FLAGS.values()] + ["upstream_tls"]
    overrides = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return GatewaySettings(**overrides)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from services.common import logging as cxr_logging
    from services.gateway.server import serve

    settings = settings_from(args)
    cxr_logging.configure(settings.log_level)

    async def main() -> None:
        started = asyncio.get_running_loop().create_future()
        if getattr(args, "port_file", None):
            def write_ports(future: asyncio.Future) -> None:
                if not future.cancelled() and future.exception() is None:
                    tmp = Path(args.port_file + ".tmp")
                    tmp.write_text("%d %d\n" % future.result())
                    tmp.replace(args.port_file)  # atomic: a reader never sees half a file

            started.add_done_callback(write_ports)
        await serve(settings, started=started)

    asyncio.run(main())
    return 0
