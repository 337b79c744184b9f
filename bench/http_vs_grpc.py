#!/usr/bin/env python3
"""KServe v2 over HTTP/REST (JSON tensors, and Triton's binary tensors) against gRPC: one `cxr serve inference`
serving both ports, the same model, the same single-image requests and the same number of concurrent clients.

Each round drives gRPC, then REST binary, then REST JSON for `--duration` seconds each, back to back, and the
ratios to gRPC are taken within the round (a shared machine's load drifts); the table gives medians over rounds.

    python bench/http_vs_grpc.py [--repository DIR] [--model custom_cnn] [--clients 1,8] [--rounds 3]

Clients: grpc.aio for gRPC, aiohttp (what tritonclient.http.aio uses) for REST, in this process, sharing the
machine's cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import closed_loop, infer_requests, latency_summary, pick_repository, served_model  # noqa: E402
from bench.inference_throughput import load_images  # noqa: E402
from cxr.processes import start_service  # noqa: E402

OUTPUT = "probabilities"


def grpc_caller(port: int, model: str, images: np.ndarray):
    import grpc

    from cxr.generated.inference import grpc_service_pb2_grpc as pb_grpc

    requests = infer_requests(model, images, [OUTPUT])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    async def call(i: int) -> None:
        response = await stub.ModelInfer(requests[i % len(requests)], timeout=60)
        assert len(response.raw_output_contents[0]) > 0

    return call, channel.close


def rest_caller(port: int, model: str, images: np.ndarray, binary: bool):
    import aiohttp

    bodies = []
    for i in range(len(images)):
        tensor = {"name": "image", "datatype": "UINT8", "shape": [1, *images.shape[1:]]}
        if binary:
            tensor["parameters"] = {"binary_data_size": images[i].nbytes}
        else:
            tensor["data"] = images[i].reshape(-1).tolist()
        header = json.dumps(
            {
                "id": f"bench-{i}",
                "inputs": [tensor],
                "outputs": [{"name": OUTPUT, "parameters": {"binary_data": binary}}],
            }
        ).encode()
        if binary:
            bodies.append(
                (
                    header + images[i].tobytes(),
                    {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
                )
            )
        else:
            bodies.append((header, {"Content-Type": "application/json"}))
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"

    async def call(i: int) -> None:
        body, headers = bodies[i % len(bodies)]
        async with session.post(url, data=body, headers=headers) as response:
            content = await response.read()
            if response.status != 200:
                raise RuntimeError(content[:200])

    return call, session.close


async def drive(call, clients: int, seconds: float) -> dict:
    await closed_loop(call, clients, 0.5)  # warm-up at this concurrency
    latencies, _, errors, elapsed = await closed_loop(call, clients, seconds)
    return latency_summary(latencies, elapsed, clients, errors)


async def measure(
    grpc_port: int, http_port: int, model: str, images: np.ndarray, clients: list[int], rounds: int, seconds: float
) -> list[dict]:
    transports = {
        "grpc": grpc_caller(grpc_port, model, images),
        "rest_binary": rest_caller(http_port, model, images, binary=True),
        "rest_json": rest_caller(http_port, model, images, binary=False),
    }
    rows = []
    try:
        for n in clients:
            per_round = []
            for _ in range(rounds):
                per_round.append({name: await drive(call, n, seconds) for name, (call, _close) in transports.items()})
            row = {"clients": n}
            for name in transports:
                row[name] = {
                    key: statistics.median(r[name][key] for r in per_round)
                    for key in ("throughput", "p50_ms", "p99_ms")
                }
                row[name]["errors"] = sum(r[name]["errors"] for r in per_round)
                row[name]["ratio_to_grpc"] = statistics.median(
                    r[name]["throughput"] / r["grpc"]["throughput"] for r in per_round
                )
            rows.append(row)
            print(
                f"  clients {n:3d}: "
                + "; ".join(
                    f"{name} {row[name]['throughput']:7.1f}/s p50 {row[name]['p50_ms']:6.1f} ms "
                    f"(x{row[name]['ratio_to_grpc']:.2f})"
                    for name in transports
                ),
                flush=True,
            )
    finally:
        for _call, close in transports.values():
            await close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", help="model repository (default: ./model_repository, else train a small one)")
    parser.add_argument(
        "--model", default=None, help="model to serve (default: custom_cnn when present, else the first)"
    )
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads of the server")
    parser.add_argument("--clients", default="1,8", help="concurrent single-image clients to measure")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per transport per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each: gRPC, REST binary, REST JSON)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        workdir = Path(tmp)
        repo = pick_repository(args.repository, workdir)
        chosen = served_model(repo, args.model, preferred="custom_cnn")
        images = load_images(chosen.size)
        print(
            f"model {chosen.name} v{chosen.version} ({chosen.size}x{chosen.size}: {images[0].nbytes} bytes per "
            f"image); {args.threads} intra-op thread(s); {os.cpu_count()} CPUs; load average "
            f"{os.getloadavg()[0]:.1f}",
            flush=True,
        )
        server = start_service(
            "inference",
            [
                "--repository",
                str(repo),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--http-port",
                "0",
                "--metrics-port",
                "-1",
                "--model-control",
                "explicit",
                "--load-model",
                chosen.name,
                "--intra-op-threads",
                str(args.threads),
            ],
            workdir,
            env={"OMP_NUM_THREADS": str(args.threads)},
        )
        try:
            rows = asyncio.run(
                measure(
                    server.port,
                    server.http_port,
                    chosen.name,
                    images,
                    [int(c) for c in args.clients.split(",")],
                    args.rounds,
                    args.duration,
                )
            )
        finally:
            server.stop()
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"model": chosen.name, "size": chosen.size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
