"""The one `cxr` entry point. Subcommands are dispatched lazily, by module path, so that
`cxr serve ...` and `cxr classify` never import torch (the serving images have none).

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their subcommand runs.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training.cli_train", "train one architecture or all of them on an image folder"),
    "evaluate": ("training.cli_evaluate", "evaluate a training run: metrics, calibration, plots"),
    "export": ("training.cli_export", "export a run to ONNX into a Triton-layout model repository"),
    "demo-data": ("training.cli_demo_data", "generate a small synthetic phantom data set (not medical data)"),
    "demo-stack": ("training.cli_demo_stack", "train a demo model if needed and serve it (inference + gateway)"),
    "serve": ("services.cli_serve", "run a service: `cxr serve inference`, `cxr serve gateway` or `cxr serve dicom`"),
    "classify": ("services.gateway.cli_classify", "classify image files through a gateway"),
}


def _module_for(argv: list[str]) -> str | None:
    for token in argv:
        if not token.startswith("-"):
            return SUBCOMMANDS.get(token, (None,))[0]
    return None


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr", description="Chest X-ray classification over gRPC. Not for clinical use."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if module_name == load:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(load=_module_for(argv))
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
