"""`cxr serve dicom --gateway HOST:PORT [--port 11112] [--ae-title CXR] [--destination AE@HOST:PORT ...]
[--dicomweb URL] [--spool DIR] [--allow-ae AE ...] [--metrics-port N] ...`

One flag per DicomSettings field (services/common/cli.py); flags override CXR_DICOM_* environment variables, which override the defaults in config.py.
Only light imports here: pynetdicom, highdicom and the node load inside run().
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.common.cli import add_settings_arguments, settings_from_args
from services.dicom.config import DicomSettings

FLAGS = {"destinations": "--destination"}  # repeatable, one destination each (or comma-separated)
SECRETS = ("gateway_token", "dicomweb_token")  # environment only: a flag would show them in `ps`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, DicomSettings, flags=FLAGS, exclude=SECRETS)
    parser.add_argument(
        "--port-file", help="write 'DICOM_PORT METRICS_PORT' here once listening (for tests and scripts)"
    )


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from services.common import logging as cxr_logging
    from services.common.serving import start_metrics_server
    from services.dicom.node import DicomNode

    settings = settings_from_args(DicomSettings, args)
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
