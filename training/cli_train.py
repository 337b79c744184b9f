"""`cxr train --data DIR --arch ARCH|all --out RUN_DIR`: train on an image folder (see training/train.py)."""

from __future__ import annotations

import argparse

from training.models import ARCHITECTURES

DEFAULT_ALL = ("custom_cnn", "resnet50", "mobilenet")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="image folder: <class>/... (ImageFolder) or <class>/images/... (Radiography DB)")
    parser.add_argument("--arch", required=True, choices=(*ARCHITECTURES, "all"),
                        help=f"network, or 'all' for {', '.join(DEFAULT_ALL)} (one sub-folder each)")
    parser.add_argument("--out", required=True, help="run folder (resumed when it holds a previous run)")
    parser.add_argument("--epochs", type=int, default=30, help="maximum epochs (early stopping may end sooner)")
    parser.add_argument("--image-size", type=int, default=224, help="square input side, a multiple of 32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (one-cycle schedule, AdamW)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.05)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--weights", default="none", help="none (from scratch), imagenet (torchvision, needs internet once) or a state-dict PATH")
    parser.add_argument("--frozen-epochs", type=int, default=2, help="with pretrained weights: epochs that train only the head")
    parser.add_argument("--fine-tune-layers", type=int, default=None, help="then fine-tune the top N backbone blocks (default: all)")
    parser.add_argument("--manifest", default=None, help="CSV with file, patient, source_origin columns (default: DATA/manifest.csv when present); the split keeps each patient on one side")
    parser.add_argument("--classes", default=None, help="comma-separated classes in output order (default: Normal,Lung_Opacity,Viral Pneumonia)")
    parser.add_argument("--rotation", type=float, default=10.0, help="augmentation: max rotation in degrees (0 = off)")
    parser.add_argument("--zoom", type=float, default=0.1, help="augmentation: zoom range +/- (0 = off)")
    parser.add_argument("--shift", type=float, default=0.05, help="augmentation: max shift as a fraction of the side")
    parser.add_argument("--no-hflip", dest="hflip", action="store_false", help="augmentation: no horizontal flips")
    parser.add_argument("--contrast", type=float, default=0.1, help="augmentation: brightness/contrast jitter +/- (0 = off)")
    parser.add_argument("--balance", choices=("weights", "none"), default="weights", help="class imbalance: class-weighted loss, or none")
    parser.add_argument("--patience", type=int, default=10, help="early stopping after N epochs without a better val macro AUC")
    parser.add_argument("--ema-decay", type=float, default=0.98, help="validate and keep a moving average of the weights (0: off)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-per-class", type=int, default=None, help="use at most N images per class (quick runs)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="start over even if the run folder has last.pt")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.data import parse_classes
    from training.train import TrainConfig, train

    if args.image_size % 32:
        raise SystemExit(f"--image-size {args.image_size}: must be a multiple of 32 (the class maps are 1/32 of it)")
    archs = DEFAULT_ALL if args.arch == "all" else (args.arch,)
    out = Path(args.out)
    for arch in archs:
        weights = args.weights
        if arch == "custom_cnn" and weights == "imagenet" and args.arch == "all":
            print("cxr train: custom_cnn has no ImageNet weights: it trains from scratch, the others start from ImageNet")
            weights = "none"
        cfg = TrainConfig(
            data=str(Path(args.data).resolve()), architecture=arch, classes=parse_classes(args.classes),
            manifest=str(Path(args.manifest).resolve()) if args.manifest else None, image_size=args.image_size,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            label_smoothing=args.label_smoothing, dropout=args.dropout, weights=weights,
            frozen_epochs=args.frozen_epochs, fine_tune_layers=args.fine_tune_layers, rotation=args.rotation,
            zoom=args.zoom, shift=args.shift, hflip=args.hflip, contrast=args.contrast, balance=args.balance,
            patience=args.patience, ema_decay=args.ema_decay, val_fraction=args.val_fraction, seed=args.seed, max_per_class=args.max_per_class,
            threads=args.threads,
        )
        try:
            train(cfg, out / arch if args.arch == "all" else out, resume=args.resume)
        except (FileNotFoundError, RuntimeError) as exc:  # missing data or weights: say what to do, no traceback
            print(f"cxr train: {exc}")
            return 2
    return 0
