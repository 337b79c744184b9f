#!/usr/bin/env python3
"""onnxruntime versions against each other: raw images/s per model and batch size, interleaved, one fresh process
per measurement (the choice of the `[inference]` pin, README "Throughput").

Each version is installed beside the project, not into it (`pip install --no-deps onnxruntime==V --target DIR`,
needs PyPI); "installed" means the environment's own onnxruntime. Each round measures every model x batch x version
once, 2 intra-op threads with spinning (onnxruntime's default); the table gives medians over the rounds.

    python bench/onnxruntime_versions.py --repository REPO --models mobilenet,resnet50 --versions installed,1.30.0,1.32.0
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ONE = """
import sys, time, numpy as np, onnxruntime as ort
path, batch, seconds, threads, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
o = ort.SessionOptions(); o.intra_op_num_threads = threads
o.add_session_config_entry("session.intra_op.allow_spinning", "1")
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).integers(0, 256, (batch, 1, size, size), dtype=np.uint8)
outs = [o.name for o in s.get_outputs() if o.name in ("probabilities", "ood_score")]
for _ in range(3): s.run(outs, {"image": x})
done, t0, c0 = 0, time.perf_counter(), time.process_time()
while time.perf_counter() - t0 < seconds:
    s.run(outs, {"image": x}); done += batch
print(ort.__version__, done / (time.perf_counter() - t0), 1e3 * (time.process_time() - c0) / done)
"""


def main() -> int:
    from bench.common import served_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", required=True)
    parser.add_argument("--models", required=True, help="comma-separated model names")
    parser.add_argument("--versions", default="installed,1.30.0,1.32.0", help="comma-separated; 'installed' for ours")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "cxr-onnxruntime-versions"))
    args = parser.parse_args()

    versions = args.versions.split(",")
    for v in versions:
        target = Path(args.cache) / v
        if v != "installed" and not (target / "onnxruntime").is_dir():
            pip = [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                f"onnxruntime=={v}",
                "--target",
                str(target),
            ]
            subprocess.run(pip, check=True)
    models = {}
    for name in args.models.split(","):
        served = served_model(Path(args.repository), name, preferred=name)
        models[name] = (served.path, served.size)
    results: dict[tuple, list[tuple[float, float]]] = {}
    found: dict[str, str] = {}
    for r in range(args.rounds):
        for name, (path, size) in models.items():
            for batch in (int(b) for b in args.batches.split(",")):
                for v in versions:
                    env = dict(os.environ)
                    if v != "installed":
                        env["PYTHONPATH"] = str(Path(args.cache) / v)
                    argv = [
                        sys.executable,
                        "-c",
                        ONE,
                        str(path),
                        str(batch),
                        str(args.seconds),
                        str(args.threads),
                        str(size),
                    ]
                    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.split()
                    found[v] = out[0]
                    results.setdefault((name, batch, v), []).append((float(out[1]), float(out[2])))
                    print(
                        f"round {r + 1}: {name} batch {batch} onnxruntime {out[0]}: {float(out[1]):.1f} images/s",
                        flush=True,
                    )
    print(f"\nraw images/s (CPU ms/image), {args.threads} threads, median of {args.rounds} interleaved rounds")
    print("| model | batch | " + " | ".join(f"{v} ({found[v]})" for v in versions) + " |")
    print("|---|---:|" + "---:|" * len(versions))
    for name in models:
        for batch in (int(b) for b in args.batches.split(",")):
            cells = []
            for v in versions:
                runs = results[(name, batch, v)]
                cells.append(
                    f"{statistics.median(x[0] for x in runs):.1f} ({statistics.median(x[1] for x in runs):.2f})"
                )
            print(f"| {name} | {batch} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
