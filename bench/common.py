"""What the benchmarks share: which model repository to measure, which model version in it is served, the closed
loop of concurrent callers, the inference requests they send, and how a window of request latencies is summarised."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from cxr import repository

ROOT = Path(__file__).resolve().parents[1]


def pick_repository(arg: str | None, workdir: Path) -> Path:
    """The repository given, else ./model_repository when it has models, else a small one trained now (needs torch)."""
    if arg:
        return Path(arg)
    default = ROOT / "model_repository"
    if default.is_dir() and repository.list_models(default):
        return default
    from training.testing import build_test_repository  # the fallback needs torch

    data = Path(os.environ.get("CXR_RAW_DATA", ROOT.parent / "shared" / "data" / "cxr-raw"))
    print(f"no model repository given: training a small one on {data} ...", flush=True)
    return build_test_repository(data, workdir)


@dataclass
class ServedModel:
    """The version of a model that the service serves by default (the newest its version policy allows)."""

    name: str
    version: int
    config: object  # cxr.generated.inference.model_config_pb2.ModelConfig
    path: Path  # its model.onnx
    size: int  # square input side


def served_model(repo: Path, name: str | None, preferred: str) -> ServedModel:
    models = repository.list_models(repo)
    name = name or (preferred if preferred in models else models[0])
    config = repository.read_config(repo / name)
    version = repository.select_versions(config, repository.list_versions(repo / name))[-1]
    return ServedModel(
        name, version, config, repository.model_path(repo / name, version, config), int(config.input[0].dims[-1])
    )


def latency_summary(latencies: list[float], elapsed: float, clients: int, errors: int) -> dict:
    """Throughput and p50/p99 latency (ms) of the requests answered in `elapsed` seconds."""
    latencies = sorted(latencies)
    return {
        "clients": clients,
        "throughput": len(latencies) / elapsed,
        "p50_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "requests": len(latencies),
        "errors": errors,
    }


async def closed_loop(call, clients: int, seconds: float) -> tuple[list[float], list, int, float]:
    """`clients` concurrent callers, each awaiting `call(i)` back to back for `seconds` (caller k sends i = k,
    k + clients, ...). Returns the latencies (s) and answers of the calls that succeeded, the count of those that
    raised, and the window's length (s). A warm-up is one more window whose results are dropped."""
    latencies: list[float] = []
    answers: list = []
    errors = 0
    start = time.perf_counter()
    stop_at = start + seconds

    async def client(k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                answers.append(await call(i))
                latencies.append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - counted, the run goes on
                errors += 1
            i += clients

    await asyncio.gather(*(client(k) for k in range(clients)))
    return latencies, answers, errors, time.perf_counter() - start


def infer_requests(model: str, images, outputs: list[str]) -> list:
    """One KServe v2 ModelInferRequest per image of uint8 `images` [N, 1, H, W], asking for `outputs`."""
    from cxr.generated.inference import grpc_service_pb2 as pb

    requests = []
    for i in range(len(images)):
        request = pb.ModelInferRequest(model_name=model, id=f"bench-{i}")
        request.inputs.add(name="image", datatype="UINT8", shape=[1, *images.shape[1:]])
        request.raw_input_contents.append(images[i : i + 1].tobytes())
        for name in outputs:
            request.outputs.add(name=name)
        requests.append(request)
    return requests
