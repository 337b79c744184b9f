"""`cxr serve inference ...`, `cxr serve gateway ...` and `cxr serve dicom ...`: each service module owns its own flags.

Each service package has a `cli` module with `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib

SERVICES = {
    "inference": ("services.inference.cli", "KServe v2 / Triton-compatible gRPC inference over onnxruntime"),
    "gateway": ("services.gateway.cli", "the cxr.v1 gRPC API for PACS integrations"),
    "dicom": (
        "services.dicom.cli",
        "DICOM node: C-STORE SCP, classifies through the gateway, returns SR + SC to the PACS",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for name, (module_name, help_text) in SERVICES.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)  # only the service packages: no torch
        module.add_arguments(sp)
        sp.set_defaults(_serve=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._serve(args) or 0)
