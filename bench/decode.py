#!/usr/bin/env python3
"""The gateway's decode and resize, ms per image: the reader now against the float64 formula it replaced.

For real radiographs in the encodings a PACS sends (1024x1024 unless named otherwise):
- decode, before: pydicom's `pixel_array`, then rescale, window, full range to 8 bits and inversion over every pixel
  in float64 (tests/cxr/float_reference.py, the reader before issue 11, without its header checks, which cost
  ~0.1 ms). PNG and JPEG of 8 bits decode as they did, so only "now" is shown for them.
- decode, now: `cxr.imaging.read_image` (the chain computed once per distinct stored value, as a lookup table).
- resize, before: Pillow's antialiased bilinear straight to the model's input; now: `cxr.imaging.resize_for_model`
  (box-reduced first when the image is 4x the model's side or more: a few grey levels apart, see its docstring).
Every step is timed once per round, all steps interleaved in each round, so the machine's load drifts over all of
them alike; the medians over the rounds are printed. Decode before and now give the same pixels (checked first).

    python bench/decode.py [--rounds 300] [--size 224] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway_throughput import inputs as gateway_inputs  # noqa: E402
from cxr.imaging import read_image, resize_for_model  # noqa: E402
from tests.cxr.float_reference import float_dicom_pixels, float_png16_pixels  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
FIFTEEN_BIT = "derived/RG1_derived_MONO2_15bit_ExplicitVRLE.dcm"  # a real CR's 15-bit pixels (see its README)


def inputs() -> dict[str, bytes]:
    """The gateway bench's three encodings of one real 1024x1024 radiograph, plus: a real 15-bit CR at 1024x1024
    as a 12-bit MONOCHROME1 DICOM with rescale and window, the same as a 16-bit PNG, the 1024x1024 radiograph as
    JPEG, and a real 224x224 PNG."""
    import pydicom
    from PIL import Image

    encoded = gateway_inputs()
    dicom_dir = Path(os.environ.get("CXR_DICOM_DATA", DATA / "dicom"))
    ds = pydicom.dcmread(dicom_dir / FIFTEEN_BIT)
    real = Image.fromarray(ds.pixel_array.astype(np.float32)).resize((1024, 1024), Image.BILINEAR)
    values = np.asarray(real, dtype=np.float64)
    twelve = np.rint((values - values.min()) * 4095 / (values.max() - values.min())).astype(np.uint16)
    ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit = 1024, 1024, 12, 11
    ds.PixelData = (4095 - twelve).tobytes()  # MONOCHROME1: high values are dark
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "US"
    ds.WindowCenter, ds.WindowWidth = 900, 3000
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    encoded["dicom 16-bit 1024x1024 MONOCHROME1 rescale+window"] = out.getvalue()
    png16 = io.BytesIO()
    Image.fromarray(twelve * 16).save(png16, format="PNG")
    encoded["png 16-bit 1024x1024"] = png16.getvalue()
    nih = read_image(encoded["dicom 8-bit 1024x1024"]).pixels
    jpeg = io.BytesIO()
    Image.fromarray(nih).save(jpeg, format="JPEG", quality=90)
    encoded["jpeg 8-bit 1024x1024"] = jpeg.getvalue()
    raw = Path(os.environ.get("CXR_RAW_DATA", DATA / "cxr-raw"))
    small = next(p for p in sorted((raw / "Normal").glob("*.png")) if Image.open(p).size == (224, 224))
    encoded["png 8-bit 224x224"] = small.read_bytes()
    return encoded


def full_filter_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """resize_for_model before issue 11: no reduction first."""
    from PIL import Image

    if pixels.shape == (size, size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def before(name: str) -> Callable[[bytes], np.ndarray] | None:
    """The decode before issue 11, where it differed from now."""
    if name.startswith("dicom"):
        return float_dicom_pixels
    if name.startswith("png 16-bit"):
        return float_png16_pixels
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="timed rounds (each times every step once)")
    parser.add_argument("--size", type=int, default=224, help="the model's input side")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    encoded = inputs()
    steps: dict[tuple[str, str], Callable[[], object]] = {}
    for name, data in encoded.items():
        now = read_image(data).pixels
        old = before(name)
        if old is not None:
            assert np.array_equal(old(data), now), f"{name}: before and now differ"
            steps[(name, "decode before")] = lambda old=old, data=data: old(data)
        steps[(name, "decode now")] = lambda data=data: read_image(data)
        steps[(name, "resize before")] = lambda now=now: full_filter_resize(now, args.size)
        steps[(name, "resize now")] = lambda now=now: resize_for_model(now, args.size)
    for step in steps.values():  # warm up (imports, caches)
        step()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(args.rounds):
        for key, step in steps.items():
            started = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - started)
    ms = {key: 1e3 * statistics.median(values) for key, values in times.items()}

    load = os.getloadavg()
    print(
        f"{args.rounds} interleaved rounds; medians in ms; resize to {args.size}x{args.size}; {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
    )
    print(
        "| input | bytes | decode before | decode now | resize before | resize now | decode+resize before | "
        "decode+resize now | before/now |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = {}
    for name, data in encoded.items():
        now, resize_old, resize_now = (ms[(name, step)] for step in ("decode now", "resize before", "resize now"))
        old = ms.get((name, "decode before"), now)  # 8-bit PNG and JPEG: decoded as before
        row = {
            "decode_before_ms": old,
            "decode_now_ms": now,
            "resize_before_ms": resize_old,
            "resize_now_ms": resize_now,
        }
        results[name] = {"bytes": len(data), **row}
        shown = f"{old:.2f}" if (name, "decode before") in ms else "(as now)"
        total_old, total_now = old + resize_old, now + resize_now
        print(
            f"| {name} | {len(data)} | {shown} | {now:.2f} | {resize_old:.2f} | {resize_now:.2f} | {total_old:.2f} | "
            f"{total_now:.2f} | {total_old / total_now:.1f}x |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": args.rounds, "size": args.size, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
