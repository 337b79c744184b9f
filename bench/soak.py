#!/usr/bin/env python3
"""Soak: N clients for T minutes through the gateway, as an operator's long run.

`cxr serve inference` (the one model, explicit control) and `cxr serve gateway` run as subprocesses; N closed-loop
client threads (bench/load.py) send Classify requests back to back, each with its own request id. Printed:

- throughput per window (requests answered per second in each `--window` seconds) and errors by status code;
- lost (sent, never answered), duplicated (an id answered twice, by the client or in the gateway's request
  log) and mismatched (answered with another request's id) answers;
- RSS of both services idle after a warm-up and idle again after the load, and its growth.

    python bench/soak.py [--repository DIR] [--model custom_cnn] [--clients 16] [--minutes 10] [--window 30]

With --check it exits 1 unless the goals hold: 0 errors, 0 lost, duplicated or mismatched, RSS growth of each
service under 10%. Clients, gateway and inference share this machine's cores: say so with any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import pick_repository  # noqa: E402
from bench.load import ClassifyLoad  # noqa: E402
from cxr.processes import ServiceProcess, start_service  # noqa: E402

RSS_GROWTH_LIMIT = 0.10


def rss_mib(process: ServiceProcess) -> float:
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def gateway_log_duplicates(gateway: ServiceProcess) -> int:
    """Request ids the gateway logged more than once with code OK (one request answered twice)."""
    seen: Counter = Counter()
    for line in gateway.log_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == "request" and entry.get("code") == "OK":
            seen[entry.get("request_id")] += 1
    return sum(n - 1 for n in seen.values() if n > 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--repository", help="model repository (default: ./model_repository, else a small one trained now)"
    )
    parser.add_argument("--model", default="custom_cnn")
    parser.add_argument("--image", help="image file to send (default: the shared data's CR-MONO1-10-chest.dcm)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=30.0, help="seconds per throughput window")
    parser.add_argument("--warmup", type=int, default=2000, help="requests before the first RSS reading")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the goals hold")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cxr-soak-"))
    repository = pick_repository(args.repository, work / "trained")
    data_dir = Path(os.environ.get("CXR_DICOM_DATA", ROOT.parent / "shared" / "data" / "dicom"))
    image = Path(args.image) if args.image else data_dir / "CR-MONO1-10-chest.dcm"
    env = {"OMP_NUM_THREADS": "1"}
    inference = start_service(
        "inference",
        [
            "--repository",
            str(repository),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--model-control",
            "explicit",
            "--load-model",
            args.model,
            "--intra-op-threads",
            "1",
        ],
        work,
        env=env,
    )
    gateway = start_service(
        "gateway",
        [
            "--inference",
            inference.address,
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--host",
            "127.0.0.1",
            "--default-model",
            args.model,
        ],
        work,
        env=env,
    )
    services = {"inference": inference, "gateway": gateway}
    try:
        # warm up at the soak's own concurrency: the batch sizes it makes (and the onnxruntime arenas they allocate,
        # which are kept) are then there before the first RSS reading, so growth measures leaks, not warm-up
        warm = ClassifyLoad(gateway.address, image.read_bytes(), clients=args.clients, prefix="warm").start()
        warm.wait_answers(args.warmup, timeout=600)
        warm.stop()
        time.sleep(2.0)
        rss_start = {name: rss_mib(s) for name, s in services.items()}

        load = ClassifyLoad(gateway.address, image.read_bytes(), clients=args.clients, prefix="soak").start()
        started = time.monotonic()
        end = started + args.minutes * 60
        windows = []
        mark = 0
        print(
            f"soak: {args.clients} clients for {args.minutes:g} min through the gateway, model {args.model}, "
            f"image {image.name}; windows of {args.window:g} s",
            flush=True,
        )
        while time.monotonic() < end:
            time.sleep(min(args.window, max(0.0, end - time.monotonic())))
            now, upto = time.monotonic(), load.mark()
            span = now - (started + args.window * len(windows))
            codes = load.codes(mark, upto)
            window = {
                "t_s": round(now - started, 1),
                "throughput": round((upto - mark) / span, 1),
                "errors": {c: n for c, n in codes.items() if c != "OK"},
                # under load: a leak climbs window after window, a warm-up levels off
                "rss_mib": {name: round(rss_mib(service), 1) for name, service in services.items()},
            }
            windows.append(window)
            print(json.dumps(window), flush=True)
            mark = upto
        elapsed = time.monotonic() - started
        load.stop()
        time.sleep(2.0)
        rss_end = {name: rss_mib(s) for name, s in services.items()}
        codes = load.codes()
        integrity = load.integrity()
        integrity["duplicated_in_gateway_log"] = gateway_log_duplicates(gateway)
        growth = {name: (rss_end[name] - rss_start[name]) / rss_start[name] for name in services}
        summary = {
            "clients": args.clients,
            "minutes": round(elapsed / 60, 2),
            "model": args.model,
            "image": image.name,
            "answered": integrity["answered"],
            "throughput": round(integrity["answered"] / elapsed, 1),
            "errors_by_code": {c: n for c, n in codes.items() if c != "OK"},
            **integrity,
            "rss_mib_start": {k: round(v, 1) for k, v in rss_start.items()},
            "rss_mib_end": {k: round(v, 1) for k, v in rss_end.items()},
            "rss_growth_pct": {k: round(100 * v, 2) for k, v in growth.items()},
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        }
        print(json.dumps(summary, indent=2), flush=True)
        ok = (
            not summary["errors_by_code"]
            and integrity["lost"] == integrity["duplicated"] == 0
            and integrity["mismatched"] == integrity["duplicated_in_gateway_log"] == 0
            and all(g < RSS_GROWTH_LIMIT for g in growth.values())
        )
        print("goals (0 errors, 0 lost/duplicated/mismatched, RSS growth < 10%):", "met" if ok else "NOT met")
        return 0 if ok or not args.check else 1
    finally:
        for service in (gateway, inference):
            service.stop()


if __name__ == "__main__":
    sys.exit(main())
