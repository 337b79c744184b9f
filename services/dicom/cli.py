"""`cxr serve dicom --gateway HOST:PORT [--port 11112] [--ae-title CXR] [--destination AE@HOST:PORT ...]
[--dicomweb URL] [--spool DIR] [--allow-ae AE ...] [--metrics-port N] ...`

Flags override CXR_DICOM_* environment variables, which override the defaults in config.py.
Only light imports here: pynetdicom, highdicom and the node load inside run().
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.dicom.config import DicomSettings

# flag -> (settings field, type); help text comes from the field's docstring
FLAGS = {
    "--gateway": ("gateway", str),
    "--host": ("host", str),
    "--port": ("port", int),
    "--ae-title": ("ae_title", str),
    "--dicomweb": ("dicomweb", str),
    "--spool": ("spool", Path),
    "--metrics-port": ("metrics_port", int),
    "--model": ("model", str),
    "--model-version": ("model_version", str),
    "--workers": ("workers", int),
    "--request-timeout": ("request_timeout_s", float),
    "--gateway-ca": ("gateway_ca", Path),
    "--gateway-cert": ("gateway_cert", Path),
    "--gateway-key": ("gateway_key", Path),
    "--gateway-token-file": ("gateway_token_file", Path),
    "--retry-backoff": ("retry_backoff_s", float),
    "--retry-backoff-max": ("retry_backoff_max_s", float),
    "--send-attempts": ("send_attempts", int),
    "--classify-attempts": ("classify_attempts", int),
    "--network-timeout": ("network_timeout_s", float),
    "--log-level": ("log_level", str),
}
# repeatable flags: --destination A@h:1 --destination B@h:2, or --destination A@h:1 B@h:2
LISTS = {"--destination": "destinations", "--allow-ae": "allow_ae"}
SWITCHES = {"--gateway-tls": "gateway_tls"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fields = DicomSettings.model_fields
    for flag, (name, kind) in FLAGS.items():
        parser.add_argument(flag, dest=name, type=kind, default=None, help=f"{fields[name].description} (default: {fields[name].default})")
    for flag, name in LISTS.items():
        parser.add_argument(flag, dest=name, action="extend", nargs="+", default=None, metavar=flag.strip("-").upper().replace("-", "_"),
                            help=fields[name].description)
    for flag, name in SWITCHES.items():
        parser.add_argument(flag, dest=name, action="store_true", default=None, help=fields[name].description)
    parser.add_argument("--no-heatmap", dest="heatmap", action="store_false", default=None, help="do not create the Secondary Capture (SR only)")
    parser.add_argument("--port-file", help="write 'DICOM_PORT METRICS_PORT' here once listening (for tests and scripts)")


def settings_from(args: argparse.Namespace) -> DicomSettings:
    """Settings from the environment, with every flag given on the command line taking precedence."""
    names = [name for name, _ in FLAGS.values()] + list(LISTS.values()) + list(SWITCHES.values()) + ["heatmap"]
    overrides = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return DicomSettings(**overrides)


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from services.common import logging as cxr_logging
    from services.common.serving import start_metrics_server
    from services.dicom.node import DicomNode

    settings = settings_from(args)
    cxr_logging.configure(settings.log_level)
    node = DicomNode(settings)
    metrics_port = start_metrics_server(settings.metrics_port, node.metrics.registry)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    port = node.start()
    if getattr(args, "port_file", None):
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(f"{port} {metrics_port}\n")
        tmp.replace(args.port_file)  # atomic: a reader never sees half a file
    stop.wait()
    node.stop()
    return 0
