"""`cxr demo-data --out DIR`: generate synthetic chest-like phantoms (a demo data set, NOT medical data)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to create (ImageFolder layout + manifest.csv)")
    parser.add_argument("--per-class", type=int, default=60, help="images per class")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument(
        "--classes", default=None, help="comma-separated class names (default: Normal,Lung_Opacity,Viral Pneumonia)"
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from training.data import parse_classes
    from training.demo_data import NOTICE, generate

    out = generate(args.out, args.per_class, args.size, parse_classes(args.classes), args.seed)
    print(f"wrote {args.per_class} phantoms per class to {out}\n{NOTICE}", end="")
    return 0
