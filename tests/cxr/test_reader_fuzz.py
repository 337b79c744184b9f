"""Fuzz target for the image reader (Hypothesis): real files, mutated (bytes overwritten, cut, inserted, removed,
spliced), must decode to a valid image or be refused with an ImageError and a reason: never another exception,
never a hang.

`make test` runs a bounded, derandomised number of executions (CXR_FUZZ_EXAMPLES, default 150). A longer run by
hand, with fresh random examples:

    CXR_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/gateway/test_reader_fuzz.py -q
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxr.imaging import ImageError, ImageLimits, read_image
from tests.conftest import SHARED_DATA
from tests.cxr.corpus import NIH, NO_PREAMBLE, _dicom_bytes, _encapsulated

EXAMPLES = int(os.environ.get("CXR_FUZZ_EXAMPLES", "150"))
REASONS = {
    "empty",
    "too_large",
    "unknown_format",
    "corrupt",
    "truncated",
    "too_many_pixels",
    "too_small",
    "not_grayscale",
    "multi_frame",
    "no_pixel_data",
    "unsupported_bits",
    "unsupported_transfer_syntax",
}
LIMITS = ImageLimits(max_bytes=8 * 1024 * 1024, max_pixels=4_000_000)


def _seeds() -> list[bytes]:
    import pydicom
    from pydicom.uid import JPEGBaseline8Bit, RLELossless

    dicom_dir = Path(os.environ.get("CXR_DICOM_DATA", str(SHARED_DATA / "dicom")))
    if not dicom_dir.is_dir():
        return []
    small = np.asarray(Image.fromarray(read_image((dicom_dir / NO_PREAMBLE).read_bytes()).pixels).resize((64, 64)))
    seeds = []
    for fmt in ("PNG", "JPEG"):
        out = io.BytesIO()
        Image.fromarray(small).save(out, format=fmt)
        seeds.append(out.getvalue())
    ds = pydicom.dcmread(dicom_dir / NIH, force=True)
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = small.tobytes()
    seeds.append(_dicom_bytes(ds))
    seeds.append(_encapsulated(ds, [seeds[1]], JPEGBaseline8Bit))
    rle = copy.deepcopy(ds)
    rle.compress(RLELossless, small)
    seeds.append(_dicom_bytes(rle))
    return seeds


SEEDS = _seeds()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["overwrite", "cut", "insert", "remove", "splice"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "remove":
            del data[at : at + draw(st.integers(1, 256))]
        else:  # a piece of another seed
            other = draw(st.sampled_from(SEEDS))
            start = draw(st.integers(0, len(other) - 1))
            data[at : at + 512] = other[start : start + 512]
    return bytes(data)


@pytest.mark.skipif(not SEEDS, reason="the real DICOM files are needed for the fuzz seeds (CXR_DICOM_DATA)")
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize="CXR_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated())
def test_mutated_files_decode_or_are_refused_with_a_reason(data: bytes):
    try:
        decoded = read_image(data, limits=LIMITS)
    except ImageError as exc:
        assert exc.reason in REASONS and str(exc)
        return
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.ndim == 2
    assert min(decoded.pixels.shape) >= LIMITS.min_side
