#!/usr/bin/env python3
"""End-to-end throughput through the gateway vs the same steps in one process, measured in one run.

For each input (1024x1024 radiographs: the real NIH DICOM as stored (8-bit), the same pixels as a 16-bit
12-bits-stored DICOM with a window, and as an 8-bit PNG):
1. In-process baseline: cxr.imaging.read_image -> resize_for_model -> onnxruntime (batch 1) on the same ONNX
   file, back to back in one thread: the work the stack does, minus gRPC, processes and batching. Measured
   before and after the stack; the faster of the two is the baseline.
2. Stack: `cxr serve inference` + `cxr serve gateway` as subprocesses; N concurrent clients send Classify
   requests with the file's bytes, back to back (N = 1, 4, 16).
Prints images/s, p50/p99 latency, and the ratio to the in-process baseline. The decode and resize alone, per
encoding and against the reader before issue 11: bench/decode.py (which uses these inputs too).

    python bench/gateway_throughput.py [--repository DIR] [--model ensemble] [--threads 2] [--duration 8]

Repository: --repository, else ./model_repository when present, else a small one trained here on real
radiographs (training.testing, 64x64 models; needs the [train] extra). Clients, gateway and inference share
this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import closed_loop, infer_requests, latency_summary, pick_repository, served_model  # noqa: E402
from cxr.imaging import read_image, resize_for_model  # noqa: E402
from cxr.processes import ServiceProcess, start_service  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
NIH_DICOM = "nih_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"


def inputs() -> dict[str, bytes]:
    """Three encodings of one real 1024x1024 chest radiograph (NIH ChestX-ray14, via ../shared/data/dicom)."""
    import pydicom
    from PIL import Image

    path = Path(os.environ.get("CXR_DICOM_DATA", DATA / "dicom")) / NIH_DICOM
    original = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(original))
    pixels = ds.pixel_array.astype(np.uint16)
    assert pixels.shape == (1024, 1024)
    ds16 = pydicom.dcmread(io.BytesIO(original))
    ds16.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds16.BitsAllocated, ds16.BitsStored, ds16.HighBit = 16, 12, 11
    ds16.PixelData = (pixels * 16).tobytes()  # 12 bits stored, as a CR/DX modality writes
    ds16.WindowCenter, ds16.WindowWidth = 2048, 4096
    out16 = io.BytesIO()
    ds16.save_as(out16, enforce_file_format=True)
    png = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(png, format="PNG")
    small = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).resize((224, 224), Image.BILINEAR).save(small, format="PNG")
    return {
        "png 8-bit 224x224": small.getvalue(),
        "dicom 8-bit 1024x1024": original,
        "dicom 16-bit 1024x1024": out16.getvalue(),
        "png 8-bit 1024x1024": png.getvalue(),
    }


def baseline(model_path: Path, size: int, data: bytes, threads: int, seconds: float) -> dict:
    """Decode, resize and onnxruntime in this process, one image after another."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # as the inference service runs its sessions: no spin-waiting threads (they steal the cores others need)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def once() -> None:
        pixels = resize_for_model(read_image(data).pixels, size)
        session.run(["probabilities"], {"image": pixels[None, None]})

    for _ in range(3):
        once()
    latencies = []
    stop_at = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        once()
        latencies.append(time.perf_counter() - t0)
    return latency_summary(latencies, time.perf_counter() - start, 1, 0)


def start(name: str, argv: list[str], workdir: Path, threads: int) -> ServiceProcess:
    return start_service(
        name,
        [*argv, "--host", "127.0.0.1", "--port", "0", "--http-port", "-1"],
        workdir,
        env={"OMP_NUM_THREADS": str(threads)},
    )


async def drive(port: int, model: str, data: bytes, clients: int, seconds: float) -> dict:
    """`clients` concurrent callers sending Classify requests with `data`, back to back, for `seconds`."""
    import grpc

    from cxr.generated.cxr.v1 import gateway_pb2 as pb
    from cxr.generated.cxr.v1 import gateway_pb2_grpc as pb_grpc

    request = pb.ClassifyRequest(image=data, model_name=model)
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = pb_grpc.GatewayStub(channel)
        for _ in range(3):
            await stub.Classify(request, timeout=60)

        def call(_i: int):
            return stub.Classify(request, timeout=60)

        await closed_loop(call, clients, 1.0)  # warm-up at this concurrency
        latencies, responses, errors, elapsed = await closed_loop(call, clients, seconds)
    summary = latency_summary(latencies, elapsed, clients, errors)
    # the gateway's own account of each request
    timings = [
        (r.timings.decode_ms, r.timings.preprocess_ms, r.timings.inference_ms, r.timings.total_ms) for r in responses
    ]
    medians = np.median(np.array(timings), axis=0)
    summary.update(zip(("gw_decode_ms", "gw_preprocess_ms", "gw_inference_ms", "gw_total_ms"), map(float, medians)))
    return summary


async def model_infer(port: int, model: str, pixels: np.ndarray, seconds: float) -> dict:
    """One client sending ModelInfer straight to the inference service, the tensor and outputs the gateway sends."""
    import grpc

    from cxr.generated.inference import grpc_service_pb2_grpc as pb_grpc

    (request,) = infer_requests(model, pixels[None, None], ["probabilities", "ood_score"])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            await stub.ModelInfer(request, timeout=60)
        latencies, _, errors, elapsed = await closed_loop(lambda _i: stub.ModelInfer(request, timeout=60), 1, seconds)
    return latency_summary(latencies, elapsed, 1, errors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", help="model repository (default: ./model_repository, else train a small one)")
    parser.add_argument("--model", default=None, help="model (default: ensemble when present, else the first)")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="onnxruntime intra-op threads, baseline and service alike",
    )
    parser.add_argument("--decode-workers", type=int, default=os.cpu_count() or 1, help="gateway decode threads")
    parser.add_argument("--decode-processes", type=int, default=0, help="gateway decode worker processes (0: threads)")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients to measure")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per point")
    parser.add_argument("--hop-rounds", type=int, default=5, help="alternating ModelInfer / Classify windows")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cxr-gw-bench-") as tmp:
        workdir = Path(tmp)
        repo = pick_repository(args.repository, workdir)
        chosen = served_model(repo, args.model, preferred="ensemble")
        model, version, model_path, size = chosen.name, chosen.version, chosen.path, chosen.size
        encoded = inputs()
        print(
            f"model {model} v{version} ({size}x{size}); {args.threads} intra-op threads; {args.decode_workers} gateway "
            f"decode threads, {args.decode_processes} decode processes; {os.cpu_count()} CPUs; "
            f"{platform.processor() or platform.machine()}",
            flush=True,
        )

        results: dict[str, dict] = {}
        for name, data in encoded.items():
            results[name] = {
                "bytes": len(data),
                "baseline": baseline(model_path, size, data, args.threads, args.duration),
                "stack": [],
            }
            b = results[name]["baseline"]
            print(
                f"  {name} ({len(data)} bytes) in-process: {b['throughput']:7.1f} images/s  p50 {b['p50_ms']:7.2f} ms",
                flush=True,
            )

        inference = start(
            "inference",
            ["--repository", str(repo), "--metrics-port", "0", "--intra-op-threads", str(args.threads)],
            workdir,
            args.threads,
        )
        gateway = start(
            "gateway",
            [
                "--inference",
                inference.address,
                "--metrics-port",
                "0",
                "--decode-workers",
                str(args.decode_workers),
                "--decode-processes",
                str(args.decode_processes),
            ],
            workdir,
            args.threads,
        )
        try:
            # The hop: the gateway's p50 over ModelInfer's, one client, alternating windows of each
            small = encoded["png 8-bit 224x224"]
            pixels = resize_for_model(read_image(small).pixels, size)
            hops = []
            for _ in range(args.hop_rounds):
                direct = asyncio.run(model_infer(inference.port, model, pixels, args.duration / 2))
                through = asyncio.run(drive(gateway.port, model, small, 1, args.duration / 2))
                hops.append((direct["p50_ms"], through["p50_ms"]))
                print(
                    f"  hop: ModelInfer p50 {direct['p50_ms']:.2f} ms, gateway Classify p50 {through['p50_ms']:.2f} ms: "
                    f"+{through['p50_ms'] - direct['p50_ms']:.2f} ms",
                    flush=True,
                )
            hop = {
                "model_infer_p50_ms": float(np.median([d for d, _ in hops])),
                "classify_p50_ms": float(np.median([t for _, t in hops])),
                "added_p50_ms": float(np.median([t - d for d, t in hops])),
            }
            for name, data in encoded.items():
                for clients in (int(c) for c in args.clients.split(",")):
                    row = asyncio.run(drive(gateway.port, model, data, clients, args.duration))
                    row["ratio"] = row["throughput"] / results[name]["baseline"]["throughput"]
                    results[name]["stack"].append(row)
                    print(
                        f"  {name} gateway N={clients:2d}: {row['throughput']:7.1f} images/s  p50 {row['p50_ms']:7.2f} ms  "
                        f"p99 {row['p99_ms']:7.2f} ms  ratio {row['ratio']:.2f}  errors {row['errors']}  | inside the "
                        f"gateway (median ms): decode {row['gw_decode_ms']:.1f} resize {row['gw_preprocess_ms']:.1f} "
                        f"inference call {row['gw_inference_ms']:.1f} total {row['gw_total_ms']:.1f}",
                        flush=True,
                    )
        finally:
            for service in (gateway, inference):
                service.stop(60)
        # other work on the machine shifts the numbers over a run: measure the baseline again afterwards and
        # keep the faster of the two, so the ratio is never flattered by a slow baseline
        for name, data in encoded.items():
            again = baseline(model_path, size, data, args.threads, args.duration)
            first = results[name]["baseline"]
            print(
                f"  {name} in-process again: {again['throughput']:7.1f} images/s (before: {first['throughput']:.1f})",
                flush=True,
            )
            if again["throughput"] > first["throughput"]:
                results[name]["baseline"] = again
            for row in results[name]["stack"]:
                row["ratio"] = row["throughput"] / results[name]["baseline"]["throughput"]

    print()
    print("| input | mode | clients | images/s | p50 ms | p99 ms | ratio to in-process |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        b = result["baseline"]
        print(
            f"| {name} | in-process decode+resize+onnxruntime | 1 | {b['throughput']:.1f} | {b['p50_ms']:.2f} | {b['p99_ms']:.2f} | 1.00 |"
        )
        for row in result["stack"]:
            print(
                f"| {name} | gateway -> inference (gRPC) | {row['clients']} | {row['throughput']:.1f} | {row['p50_ms']:.2f} | "
                f"{row['p99_ms']:.2f} | {row['ratio']:.2f} |"
            )
    print(
        "\n| input | clients | gateway decode ms | resize ms | inference call ms | gateway total ms | client p50 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        for row in result["stack"]:
            print(
                f"| {name} | {row['clients']} | {row['gw_decode_ms']:.1f} | {row['gw_preprocess_ms']:.1f} | "
                f"{row['gw_inference_ms']:.1f} | {row['gw_total_ms']:.1f} | {row['p50_ms']:.1f} |"
            )
    print(
        f"\nthe gateway's hop, one client, 224x224 PNG (median of {args.hop_rounds} alternating windows): ModelInfer "
        f"straight to inference p50 {hop['model_infer_p50_ms']:.2f} ms, Classify through the gateway p50 "
        f"{hop['classify_p50_ms']:.2f} ms: the gateway adds {hop['added_p50_ms']:.2f} ms"
    )
    print("\nCPU only. Clients, gateway and inference share the machine's cores with each other.")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"model": model, "version": version, "size": size, "hop": hop, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
