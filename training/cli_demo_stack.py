"""`cxr demo-stack`: the README's `make run`. Train a demo model when the repository has none, then serve it.

1. Model: reuse the repository's models when it has any. Otherwise train `custom_cnn` briefly on real radiographs
   when they are at hand ($CXR_RAW_DATA, default ../shared/data/cxr-raw), else on synthetic phantoms that
   `cxr demo-data` generates (the model is then labelled a synthetic demo everywhere), and export it.
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", default="model_repository", help="model repository to serve (trained into when empty)")
    parser.add_argument("--work", default="demo", help="folder for the demo's data, runs and logs")
    parser.add_argument("--data", default=os.environ.get("CXR_RAW_DATA", str(DEFAULT_DATA)),
                        help="real radiographs to train the demo model on when present (env CXR_RAW_DATA); else phantoms")
    parser.add_argument("--synthetic", action="store_true", help="train on generated phantoms even when real data is present")
    parser.add_argument("--epochs", type=int, default=6, help="epochs for the quick demo model")
    parser.add_argument("--image-size", type=int, default=128, help="input size of the quick demo model")
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


def _train_demo_model(args: argparse.Namespace, repository: Path, work: Path) -> tuple[str, Path]:
    """Train and export `custom_cnn`; returns the model name and an image to classify."""
    data = Path(args.data)
    if args.synthetic or not data.is_dir():
        data = work / "phantoms"
        why = "--synthetic given" if args.synthetic else f"no real radiographs at {args.data}"
        _step(f"{why}: generating synthetic phantoms in {data} (a demo, not medical data)")
        if not data.is_dir():
            _check(_cxr("demo-data", "--out", str(data)))
    else:
        _step(f"training a quick demo model on the real radiographs in {data}")
    run_dir = work / "runs" / "custom_cnn"
    _check(_cxr("train", "--data", str(data), "--arch", "custom_cnn", "--out", str(run_dir),
                "--epochs", str(args.epochs), "--image-size", str(args.image_size)))
    _step(f"exporting to {repository}")
    _check(_cxr("export", str(run_dir), "--repository", str(repository)))
    return "custom_cnn", data


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
        inference = start_service("inference", ["--repository", str(repository), "--port", str(args.inference_port),
                                                "--metrics-port", str(args.inference_metrics_port),
                                                "--http-port", str(args.inference_http_port)], work)
    except RuntimeError as exc:
        raise SystemExit(f"demo-stack: {exc}") from None
    gateway_args = ["--inference", f"localhost:{inference.port}", "--port", str(args.gateway_port),
                    "--metrics-port", str(args.gateway_metrics_port), "--http-port", str(args.gateway_http_port)]
    if model or not (repository / "ensemble").is_dir():
        default = model or sorted(p.parent.parent.name for p in repository.glob("*/[0-9]*/model.onnx"))[0]
        gateway_args += ["--default-model", default]
    children = [inference]
    try:
        children.append(start_service("gateway", gateway_args, work))
        sample = _sample_image(data)
        if sample is not None:
            _step(f"classifying {sample.name} through the gateway")
            subprocess.run(_cxr("classify", str(sample), "--server", f"localhost:{args.gateway_port}"))
        print(f"\nServing. Not for clinical use.\n"
              f"  gateway (cxr.v1 gRPC):        localhost:{args.gateway_port}   try: cxr classify FILE --server localhost:{args.gateway_port}\n"
              f"  upload page and JSON API:     http://localhost:{children[-1].http_port}/\n"
              f"  inference (KServe v2 gRPC):   localhost:{args.inference_port}   REST: http://localhost:{inference.http_port}/v2\n"
              f"  metrics: http://localhost:{args.gateway_metrics_port}/metrics  http://localhost:{args.inference_metrics_port}/metrics\n"
              f"  logs: {work}/gateway.log {work}/inference.log", flush=True)
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
