#!/usr/bin/env python3
"""int8 vs fp32: raw onnxruntime time per image, measured interleaved in one run, and the accuracy check numbers
that `cxr export --int8` wrote into the int8 model card.

For each model NAME, the fp32 graph is REPO/NAME (the version its config serves) and the int8 graph REPO/NAME_int8
(or --int8-name). Each round, at each batch size, runs the two sessions call by call in turn (fp32, int8, fp32, ...:
the same images, `--threads` intra-op threads each) for `--duration` seconds, so both see the same load on a shared
machine; the ratio is taken within a round and the table gives medians over the rounds.

    python bench/int8.py --repository DIR efficientnet_lite0 resnet50 [--batches 1 32] [--threads 2] [--rounds 5]

To time a model whose int8 graph was refused (nothing written), export it into a scratch repository with the bars
off (`cxr export RUN --repository /tmp/scratch --int8 --int8-min-agreement 0 --int8-max-auc-drop 1`): its card
then records those bars, so the table says "bars off".
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import served_model  # noqa: E402
from cxr import repository  # noqa: E402


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ms_per_image(sessions: dict, images: np.ndarray, seconds: float) -> dict[str, float]:
    """ms per image of each session, calls alternating one by one (fp32, int8, fp32, ...) so that both see the same
    load on a shared machine; at least 3 calls each."""
    feed = {"image": images}
    spent = dict.fromkeys(sessions, 0.0)
    for session in sessions.values():
        session.run(None, feed)  # warm: the first run allocates
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        for kind, session in sessions.items():
            t = time.perf_counter()
            session.run(None, feed)
            spent[kind] += time.perf_counter() - t
        calls += 1
    return {kind: 1e3 * total / (calls * len(images)) for kind, total in spent.items()}


def _images(size: int, count: int) -> np.ndarray:
    """Real radiographs when the shared data is there (the timing does not depend on pixels, the habit does)."""
    import os

    from cxr.imaging import load_for_model

    data = Path(os.environ.get("CXR_RAW_DATA", ROOT.parent / "shared" / "data" / "cxr-raw"))
    files = sorted(data.glob("*/*.png"))[:count] if data.is_dir() else []
    if len(files) < count:
        return np.random.default_rng(0).integers(0, 256, (count, 1, size, size), dtype=np.uint8)
    return np.stack([load_for_model(f, size) for f in files])[:, None]


def compare(repo: Path, name: str, int8_name: str, batches: list[int], threads: int, rounds: int, seconds: float):
    fp32 = served_model(repo, name, name)
    int8 = served_model(repo, int8_name, int8_name)
    card = repository.read_model_card(int8.path.parent)
    sessions = {"fp32": _session(fp32.path, threads), "int8": _session(int8.path, threads)}
    images = _images(fp32.size, max(batches))
    rows = []
    for batch in batches:
        times = {"fp32": [], "int8": []}
        for _ in range(rounds):
            for kind, ms in _ms_per_image(sessions, images[:batch], seconds).items():
                times[kind].append(ms)
        speedups = [a / b for a, b in zip(times["fp32"], times["int8"])]
        rows.append(
            {
                "model": name,
                "batch": batch,
                "fp32_ms": statistics.median(times["fp32"]),
                "int8_ms": statistics.median(times["int8"]),
                "speedup": statistics.median(speedups),
                "speedup_range": [min(speedups), max(speedups)],
            }
        )
    return rows, {
        "fp32": f"{fp32.name}/{fp32.version}",
        "int8": f"{int8.name}/{int8.version}",
        **card.get("quantization", {}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="NAME", help="fp32 model names; int8 is NAME_int8")
    parser.add_argument("--repository", required=True, help="model repository holding NAME and NAME_int8")
    parser.add_argument("--int8-name", default="{}_int8", help="int8 model name pattern (default: {}_int8)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of each session (default 2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement (default 2)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    import onnxruntime as ort

    repo = Path(args.repository)
    print(
        f"onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"{args.rounds} rounds x {args.duration:g} s, interleaved fp32/int8; ms per image (median over rounds)"
    )
    results = {"rows": [], "accuracy": {}}
    for name in args.models:
        rows, accuracy = compare(
            repo, name, args.int8_name.format(name), args.batches, args.threads, args.rounds, args.duration
        )
        results["rows"] += rows
        results["accuracy"][name] = accuracy
    print("\n| model | batch | fp32 ms/img | int8 ms/img | speedup (range over rounds) |\n|---|---|---|---|---|")
    for r in results["rows"]:
        low, high = r["speedup_range"]
        print(
            f"| {r['model']} | {r['batch']} | {r['fp32_ms']:.2f} | {r['int8_ms']:.2f} | "
            f"{r['speedup']:.2f}x ({low:.2f}-{high:.2f}) |"
        )
    print(
        "\n| model | int8 | validation images | top-class agreement | macro AUC fp32 | int8 | drop | gate agreement "
        "| bars |\n|---|---|---|---|---|---|---|---|---|"
    )
    for name, q in results["accuracy"].items():
        if not q:
            print(f"| {name} | {q.get('int8', '?')} | (no quantization block in the int8 model card) |")
            continue
        bars = f">= {q['min_agreement']}, <= {q['max_auc_drop']}"
        gate = f"{q['gate_agreement']:.4f}" if "gate_agreement" in q else "no gate"
        if q["min_agreement"] <= 0:
            bars += " (bars off)"
        print(
            f"| {name} | {q['int8']} | {q['validation_images']} | {q['agreement']:.4f} | {q['auc_fp32']:.4f} | "
            f"{q['auc_int8']:.4f} | {q['auc_drop']:+.4f} | {gate} | {bars} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
