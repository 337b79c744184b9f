#!/usr/bin/env python3
"""Training throughput per architecture on this machine: images/s of one full training step (augmentation,
forward, backward, AdamW) on real cxr-raw images, exactly as `cxr train` runs it, plus evaluation images/s.

The baseline is custom_cnn, measured in the same run and interleaved with the others round by round (a shared
machine's load drifts), so the ratio column is comparable across machines; the table gives medians over rounds.

    python bench/training_throughput.py [--image-size 128] [--threads 2] [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=os.environ.get("CXR_RAW_DATA", str(ROOT.parent / "shared" / "data" / "cxr-raw"))
    )
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per round and architecture")
    parser.add_argument("--arch", nargs="+", default=["custom_cnn", "mobilenet", "resnet50"])
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from training import data as D
    from training.models import build_model
    from training.train import TrainConfig, augment

    torch.set_num_threads(args.threads)
    found = D.discover(Path(args.data), list(D.DEFAULT_CLASSES), max_per_class=args.batch_size)
    images, _ = D.load_images(Path(args.data), found.samples, args.image_size)
    x_all = torch.from_numpy(images.images).unsqueeze(1)
    y_all = torch.from_numpy(images.labels)
    cfg = TrainConfig(data=args.data, architecture="custom_cnn", image_size=args.image_size)
    gen = torch.Generator().manual_seed(0)
    models = {}
    for arch in ["custom_cnn", *[a for a in args.arch if a != "custom_cnn"]]:
        model = build_model(arch, 3)
        models[arch] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    train_ips: dict[str, list[float]] = {a: [] for a in models}
    eval_ips: dict[str, list[float]] = {a: [] for a in models}
    for _ in range(args.rounds):
        for arch, (model, opt) in models.items():

            def step(model=model, opt=opt):  # bound now: the loop rebinds both
                idx = torch.randint(0, len(y_all), (args.batch_size,), generator=gen)
                loss = F.cross_entropy(model(augment(x_all[idx], cfg, gen)), y_all[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()

            model.train()
            step()  # warm-up
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            train_ips[arch].append(args.steps * args.batch_size / (time.perf_counter() - t))
            model.eval()
            with torch.no_grad():
                t = time.perf_counter()
                model(x_all[: args.batch_size * 2])
                eval_ips[arch].append(2 * args.batch_size / (time.perf_counter() - t))
    base = statistics.median(train_ips["custom_cnn"])
    print(
        f"training throughput, image size {args.image_size}, batch {args.batch_size}, {args.threads} threads, "
        f"median of {args.rounds} rounds (CPU: {os.cpu_count()} cores visible)"
    )
    print("| Architecture | Train images/s | Ratio to custom_cnn | Eval images/s |")
    print("|---|---|---|---|")
    for arch in models:
        t = statistics.median(train_ips[arch])
        print(f"| {arch} | {t:.1f} | {t / base:.2f} | {statistics.median(eval_ips[arch]):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
