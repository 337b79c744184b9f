"""`cxr train --data DIR --arch ARCH|all --out RUN_DIR`: train on an image folder (see training/train.py).
The training flags are generated from `TrainConfig`'s fields (training/config.py)."""

from __future__ import annotations

import argparse

from training.config import add_flags
from training.models import ARCHITECTURES

DEFAULT_ALL = ("custom_cnn", "resnet50", "mobilenet", "efficientnet_lite0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        required=True,
        choices=(*ARCHITECTURES, "all"),
        help=f"network, or 'all' for {', '.join(DEFAULT_ALL)} (one sub-folder each)",
    )
    parser.add_argument("--out", required=True, help="run folder (resumed when it holds a previous run)")
    parser.add_argument(
        "--no-resume", dest="resume", action="store_false", help="start over even if the run folder has last.pt"
    )
    add_flags(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pydantic import ValidationError

    from training.config import TrainConfig, args_to_fields
    from training.train import train

    archs = DEFAULT_ALL if args.arch == "all" else (args.arch,)
    out = Path(args.out)
    fields = args_to_fields(args)
    for arch in archs:
        weights = fields.get("weights", "none")
        if arch in ("resnet50", "mobilenet") and weights == "imagenet" and args.arch == "all":
            try:  # torchvision downloads them: offline that fails, and those two then train from scratch
                from training.models import build_model

                build_model(arch, 2, "imagenet")
            except RuntimeError as exc:
                print(f"cxr train: {arch}: {exc}\ncxr train: {arch} trains FROM SCRATCH instead")
                weights = "none"
        if arch == "custom_cnn" and weights == "imagenet" and args.arch == "all":
            print(
                "cxr train: custom_cnn has no ImageNet weights: it trains from scratch, the others start from ImageNet"
            )
            weights = "none"
        try:
            cfg = TrainConfig(**{**fields, "architecture": arch, "weights": weights})
        except ValidationError as exc:
            raise SystemExit(f"cxr train: {exc}") from None
        if cfg.image_size % 32:
            raise SystemExit(f"--image-size {cfg.image_size}: must be a multiple of 32 (the class maps are 1/32 of it)")
        try:
            train(cfg, out / arch if args.arch == "all" else out, resume=args.resume)
        except (FileNotFoundError, RuntimeError, ValueError) as exc:  # missing data or weights: say what to do
            print(f"cxr train: {exc}")
            return 2
    return 0
