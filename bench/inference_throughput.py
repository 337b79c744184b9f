#!/usr/bin/env python3
"""Inference service throughput vs raw onnxruntime, measured in one run on the same machine, per model.

1. Raw: onnxruntime alone on the same model file, at batch sizes 1..max_batch_size, as one session of all the CPUs'
   threads spinning, one sleeping, and one single-thread session per CPU side by side; the fastest (configuration,
   batch size) pair, by the median of 3 alternating measurements, is the baseline.
2. In process, batch 1: the latency of one image through a session shaped as one of the service's instances
   (its intra_op_thread_count), the call a lone request makes, so the service's p50 at one client shows the hop.
3. Service: `cxr serve inference` as a subprocess with the model's config as exported (its serving shape and
   dynamic batcher), driven by N concurrent clients that each send one image per request, back to back
   (N = 1, 8, 32, 64). Each round measures raw at the best batch size, then the service; the ratio is taken
   within a round (a shared machine's load drifts), and the table gives medians over the rounds.
Prints throughput, p50/p99 latency, CPU ms per image and the ratio to raw. Bar: >= 0.9 of raw at N = 32 and 64;
p50 at N = 1 within 2 ms of the in-process call.

    python bench/inference_throughput.py [--repository DIR] [--models mobilenet,resnet50] [--duration 3]

Repository: --repository, else ./model_repository when present, else a small one trained here on real radiographs
(training.testing.build_test_repository, 64x64 models; needs the [train] extra). The clients run in this process
and share the machine's cores with the server, as a sidecar or a gateway on the same node would; CPU ms per image
counts the server process only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = "probabilities"  # what a classifying client asks for (raw computes the same)
sys.path.insert(0, str(ROOT))

from bench.common import closed_loop, infer_requests, latency_summary, pick_repository, served_model  # noqa: E402
from cxr import repository  # noqa: E402
from cxr.cpus import available_cpus  # noqa: E402
from cxr.processes import ServiceProcess, start_service  # noqa: E402
from services.inference.sessions import instance_shape  # noqa: E402


def load_images(size: int, count: int = 64) -> np.ndarray:
    """Real radiographs at the model's size when the data is at hand, else random pixels (timings only)."""
    data = Path(os.environ.get("CXR_RAW_DATA", ROOT.parent / "shared" / "data" / "cxr-raw"))
    paths = sorted(data.glob("*/*.png"))[:count] if data.is_dir() else []
    if paths:
        from cxr.imaging import load_for_model

        return np.stack([load_for_model(p, size) for p in paths])[:, None]
    return np.random.default_rng(0).integers(0, 256, (count, 1, size, size), dtype=np.uint8)


class RawModel:
    """onnxruntime alone on the model file: the baseline. `sessions` > 1: that many sessions of `threads` threads
    each, run side by side from as many Python threads (onnxruntime releases the GIL), as the service's
    instances run; 1: one session."""

    def __init__(self, model_path: Path, images: np.ndarray, threads: int, spin_wait: bool = True, sessions: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        self.spin_wait = spin_wait
        self.threads = threads
        self.warm: set[int] = set()
        self.sessions = [
            ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"]) for _ in range(sessions)
        ]
        self.session = self.sessions[0]
        self.outputs = [OUTPUT]  # the same output the clients ask the service for
        self.images = images

    def describe(self) -> str:
        spin = "spinning" if self.spin_wait else "sleeping"
        if len(self.sessions) == 1:
            return f"1 session x {self.threads} threads, {spin} idle threads"
        return f"{len(self.sessions)} sessions side by side x {self.threads} thread(s)"

    def latency_p50_ms(self, seconds: float) -> float:
        """Median time of one single-image call, back to back."""
        feed = {"image": self.images[:1]}
        for _ in range(3):
            self.session.run(self.outputs, feed)
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            self.session.run(self.outputs, feed)
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    def throughput(self, batch: int, seconds: float) -> float:
        feed = {"image": np.resize(self.images, (batch, *self.images.shape[1:]))}
        if batch not in self.warm:  # the first runs at a new shape allocate and tune; not measured
            for session in self.sessions:
                for _ in range(3):
                    session.run(self.outputs, feed)
            self.warm.add(batch)
        if len(self.sessions) > 1:
            return self._side_by_side(feed, batch, seconds)
        done, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            self.session.run(self.outputs, feed)
            done += batch
        self.last_per_cpu_s = done / max(time.process_time() - cpu, 1e-9)
        return done / (time.perf_counter() - start)

    def _side_by_side(self, feed: dict, batch: int, seconds: float) -> float:
        from concurrent.futures import ThreadPoolExecutor

        start, cpu = time.perf_counter(), time.process_time()

        def loop(session) -> int:
            done = 0
            while time.perf_counter() - start < seconds:
                session.run(self.outputs, feed)
                done += batch
            return done

        with ThreadPoolExecutor(len(self.sessions)) as pool:
            done = sum(pool.map(loop, self.sessions))
        self.last_per_cpu_s = done / max(time.process_time() - cpu, 1e-9)
        return done / (time.perf_counter() - start)


def start_server(repo: Path, workdir: Path, extra: list[str]) -> ServiceProcess:
    """The service with its own defaults: each model's threads come from its config (as exported), else from the
    usable CPUs shared out between its instances (services/inference/sessions.instance_shape)."""
    return start_service(
        "inference",
        [
            "--repository",
            str(repo),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--http-port",
            "-1",
            "--metrics-port",
            "-1",
            *extra,
        ],
        workdir,
    )


def execution_counts(port: int, model: str) -> tuple[int, int]:
    """(rows inferred, batches executed) so far, from the server's ModelStatistics."""
    import grpc

    from cxr.generated.inference import grpc_service_pb2 as pb
    from cxr.generated.inference import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=30
        )
    return (sum(s.inference_count for s in stats.model_stats), sum(s.execution_count for s in stats.model_stats))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(port: int, model: str, images: np.ndarray, clients: int, seconds: float, server_pid: int) -> dict:
    """`clients` concurrent callers, each sending single-image requests back to back for `seconds`."""
    import grpc

    from cxr.generated.inference import grpc_service_pb2_grpc as pb_grpc

    requests = infer_requests(model, images, [OUTPUT])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for request in requests[:4]:  # warm the connection
            await stub.ModelInfer(request, timeout=60)

        def call(i: int):
            return stub.ModelInfer(requests[i % len(requests)], timeout=60)

        await closed_loop(call, clients, 1.0)  # warm-up at this concurrency
        cpu = cpu_seconds(server_pid)
        latencies, _, errors, elapsed = await closed_loop(call, clients, seconds)
        cpu = cpu_seconds(server_pid) - cpu  # the server's CPU time (clients would run elsewhere)
    return {**latency_summary(latencies, elapsed, clients, errors), "per_cpu_s": len(latencies) / max(cpu, 1e-9)}


def measure_model(repo: Path, name: str, args: argparse.Namespace, workdir: Path) -> dict:
    chosen = served_model(repo, name, preferred="resnet50")
    model, version, config, model_path, size = chosen.name, chosen.version, chosen.config, chosen.path, chosen.size
    images = load_images(size)
    served = repo
    if args.instances:  # another serving shape than the exported one, for comparison
        import shutil

        served = workdir / f"served-{model}"
        shutil.copytree(repo / model, served / model)
        kind = config.instance_group[0].kind if config.instance_group else 0
        del config.instance_group[:]
        config.instance_group.add(count=args.instances, kind=kind)
        per_instance = args.instance_threads or max(1, args.threads // args.instances)
        config.parameters["intra_op_thread_count"].string_value = str(per_instance)
        repository.write_config(served / model, config)
    instances, per_instance = instance_shape(config)
    batching = config.dynamic_batching
    print(
        f"\nmodel {model} v{version} ({size}x{size}, max_batch_size {config.max_batch_size}, "
        f"max_queue_delay {batching.max_queue_delay_microseconds} us); service: {instances} instance(s) x "
        f"{per_instance} intra-op thread(s); raw: {args.threads} threads; {available_cpus()} usable CPUs; "
        f"{platform.processor() or platform.machine()}",
        flush=True,
    )

    # The baseline is raw at its best: one session with spinning idle threads (onnxruntime's default), one with
    # sleeping ones, and one single-thread session per CPU side by side, each at every batch size; the fastest
    # (configuration, batch) pair wins. Each pair is measured 3 times, alternating, and judged by its median: one
    # measurement alone is at the mercy of the machine's load.
    candidates = [
        RawModel(model_path, images, args.threads),
        RawModel(model_path, images, args.threads, spin_wait=False),
    ]
    if args.threads > 1:
        candidates.append(RawModel(model_path, images, 1, spin_wait=False, sessions=args.threads))
    batches = [
        1 << i for i in range(max(1, config.max_batch_size).bit_length()) if 1 << i <= max(1, config.max_batch_size)
    ]
    trials: dict[tuple[int, int], list[float]] = {}
    for _ in range(3):
        for batch in batches:
            for i, candidate in enumerate(candidates):
                trials.setdefault((i, batch), []).append(candidate.throughput(batch, args.raw_duration / 2))
    rates = {key: statistics.median(values) for key, values in trials.items()}
    for i, candidate in enumerate(candidates):
        print(
            f"  raw, {candidate.describe()}: "
            + ", ".join(f"batch {b} {rates[(i, b)]:.1f}" for b in batches)
            + " images/s (medians of 3)",
            flush=True,
        )
    best, best_batch = max(rates, key=rates.get)
    raw_model = candidates[best]
    sweep = {b: rates[(best, b)] for b in batches}
    # The in-process call a lone request makes: one image, one session shaped as one of the service's instances.
    in_process = RawModel(model_path, images, per_instance, spin_wait=False)
    in_process_p50 = statistics.median(in_process.latency_p50_ms(args.raw_duration / 2) for _ in range(3))
    print(f"  in process, batch 1, {per_instance} thread(s): p50 {in_process_p50:.2f} ms", flush=True)
    del in_process, candidates

    server = start_server(served, workdir / f"server-{model}", args.server_arg)
    port = server.port
    rows = []
    try:
        for clients in (int(c) for c in args.clients.split(",")):
            rounds = []
            rows_before, batches_before = execution_counts(port, model)
            for _ in range(args.rounds):
                raw = raw_model.throughput(best_batch, args.duration / 2)
                service = asyncio.run(drive(port, model, images, clients, args.duration, server.process.pid))
                service["cpu_ratio"] = service["per_cpu_s"] / raw_model.last_per_cpu_s
                rounds.append((raw, service))
                print(
                    f"  N={clients:3d}: raw {raw:8.1f}  service {service['throughput']:8.1f} images/s  "
                    f"ratio {service['throughput'] / raw:.2f}  p50 {service['p50_ms']:7.2f} ms  "
                    f"p99 {service['p99_ms']:7.2f} ms  CPU {1e3 / service['per_cpu_s']:.2f} ms/image (raw "
                    f"{1e3 / raw_model.last_per_cpu_s:.2f})  errors {service['errors']}",
                    flush=True,
                )
            ratios = [s["throughput"] / r for r, s in rounds]
            rows_after, batches_after = execution_counts(port, model)
            rows.append(
                {
                    "clients": clients,
                    "raw": statistics.median(r for r, _ in rounds),
                    "throughput": statistics.median(s["throughput"] for _, s in rounds),
                    "p50_ms": statistics.median(s["p50_ms"] for _, s in rounds),
                    "p99_ms": statistics.median(s["p99_ms"] for _, s in rounds),
                    "ratio": statistics.median(ratios),
                    "ratio_range": [min(ratios), max(ratios)],
                    "cpu_ms": statistics.median(1e3 / s["per_cpu_s"] for _, s in rounds),
                    "errors": sum(s["errors"] for _, s in rounds),
                    "mean_batch": (rows_after - rows_before) / max(batches_after - batches_before, 1),
                }
            )
    finally:
        server.stop(60)
    return {
        "model": model,
        "version": version,
        "size": size,
        "shape": [instances, per_instance],
        "raw_threads": args.threads,
        "raw_sweep": sweep,
        "best_batch": best_batch,
        "raw_baseline": raw_model.describe(),
        "raw_cpu_ms": 1e3 / raw_model.last_per_cpu_s,
        "in_process_p50_ms": in_process_p50,
        "service": rows,
    }


def report(result: dict, args: argparse.Namespace) -> None:
    best = result["best_batch"]
    instances, per_instance = result["shape"]
    print(
        f"\n{result['model']} v{result['version']} ({result['size']}x{result['size']}): raw onnxruntime sweep "
        "(images/s by batch size): "
        + ", ".join(f"{b}: {v:.1f}" for b, v in result["raw_sweep"].items())
        + f"; baseline (the fastest raw): batch {best}, {result['raw_baseline']}, "
        f"{result['raw_cpu_ms']:.2f} CPU ms/image; service {instances} x {per_instance}; in-process batch-1 p50 "
        f"{result['in_process_p50_ms']:.2f} ms"
    )
    print(
        f"| clients | raw images/s (batch {best}) | service images/s | ratio to raw (min-max) | p50 ms | p99 ms "
        "| server CPU ms/image | mean batch | errors |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["service"]:
        print(
            f"| {row['clients']} | {row['raw']:.1f} | {row['throughput']:.1f} | {row['ratio']:.2f} "
            f"({row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f}) | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
            f"| {row['cpu_ms']:.2f} | {row['mean_batch']:.1f} | {row['errors']} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", help="model repository (default: ./model_repository, else train a small one)")
    parser.add_argument(
        "--models",
        default=None,
        help="models to measure, comma-separated (default: resnet50 when present, else the first)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=available_cpus(),
        help="raw onnxruntime's intra-op threads (default: all usable CPUs)",
    )
    parser.add_argument("--clients", default="1,8,32,64", help="concurrent single-image clients to measure")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of service load per round")
    parser.add_argument("--rounds", type=int, default=5, help="raw-then-service rounds per client count")
    parser.add_argument("--raw-duration", type=float, default=2.0, help="seconds per batch size in the raw sweep")
    parser.add_argument(
        "--instances",
        type=int,
        default=0,
        help="serve a copy of the model with this instance_group count instead of its exported shape",
    )
    parser.add_argument(
        "--instance-threads",
        type=int,
        default=0,
        help="with --instances: intra-op threads each (default: threads/instances)",
    )
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for `cxr serve inference`")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        workdir = Path(tmp)
        repo = pick_repository(args.repository, workdir)
        names = args.models.split(",") if args.models else [None]
        results = [measure_model(repo, name, args, workdir) for name in names]

    print(f"\nonnxruntime {onnxruntime.__version__}, CPUExecutionProvider; {available_cpus()} usable CPUs")
    print(
        f"median of {args.rounds} rounds of {args.duration:g} s; each ratio is service / raw measured in the same round; "
        "server CPU ms/image counts the server process only (the clients run in this one)"
    )
    for result in results:
        report(result, args)
    print("\nCPU only (onnxruntime CPUExecutionProvider); a CUDA run needs a GPU machine.")
    if args.json:
        Path(args.json).write_text(json.dumps({"onnxruntime": onnxruntime.__version__, "models": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
