"""The strict decode: damaged JPEG data is refused instead of classified as garbage, valid padding is not, and
images too small to be radiographs or with impossible bit depths get their own reasons. (The malformed corpus
in corpus.py holds the same cases for the end-to-end tests.)"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.imaging import ImageError, ImageLimits, read_image
from tests.cxr.corpus import NIH, zeroed_mid_stream


def _gray(dicom_dir: Path) -> np.ndarray:
    return read_image((dicom_dir / "CR-MONO1-10-chest.dcm").read_bytes()).pixels  # a real 440x440 radiograph


def _jpeg(pixels: np.ndarray, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", **options)
    return out.getvalue()


def _reason(data: bytes) -> str:
    with pytest.raises(ImageError) as info:
        read_image(data)
    return info.value.reason


def test_jpeg_with_zeroed_entropy_data_is_refused_as_corrupt(dicom_dir: Path):
    good = _jpeg(_gray(dicom_dir), quality=90)
    assert read_image(good).pixels.shape == (440, 440)
    assert _reason(zeroed_mid_stream(good)) == "corrupt"
    assert _reason(zeroed_mid_stream(_jpeg(np.dstack([_gray(dicom_dir)] * 3), quality=90))) == "corrupt"  # colour too
    assert _reason(good[: len(good) * 2 // 3]) in ("truncated", "corrupt")


def test_padding_after_eoi_is_accepted(dicom_dir: Path):
    good = _jpeg(_gray(dicom_dir))
    reference = read_image(good).pixels
    for padding in (b"\x00", b"\xff", b"\xff\xff\x00"):
        assert np.array_equal(read_image(good + padding).pixels, reference)


@pytest.mark.parametrize("progressive", [False, True])
def test_strict_grayscale_decode_gives_pillows_pixels(dicom_dir: Path, progressive: bool):
    data = _jpeg(_gray(dicom_dir), quality=75, progressive=progressive)
    assert np.array_equal(read_image(data).pixels, np.asarray(Image.open(io.BytesIO(data)).convert("L")))


def test_colour_jpeg_still_converted_by_pillow(dicom_dir: Path):
    rgb = np.dstack([_gray(dicom_dir)] * 3)
    data = _jpeg(rgb, quality=90)
    decoded = read_image(data)
    assert np.array_equal(decoded.pixels, np.asarray(Image.open(io.BytesIO(data)).convert("L")))
    assert any("converted to grayscale" in n for n in decoded.notices)


def test_pydicom_jpeg_extended_with_fill_byte_after_eoi_decodes():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("JPGExtended.dcm")  # shipped in the pydicom wheel; 12-bit JPEG, EOI then 0xFF
    decoded = read_image(Path(path).read_bytes())
    assert decoded.pixels.shape == (1024, 256) and decoded.pixels.std() > 0


def test_dicom_jpeg_baseline_strict_and_identical_to_before(dicom_dir: Path):
    """The SIIM file (JPEG baseline in DICOM) decodes with the strict decoder to pydicom's own pixels."""
    import pydicom

    from tests.cxr.corpus import SIIM_JPEG

    data = (dicom_dir / SIIM_JPEG).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.pixel_array_options(decoding_plugin="pillow")
    expected = ds.pixel_array
    decoded = read_image(data).pixels
    from cxr.imaging import _to_uint8

    assert np.array_equal(decoded, _to_uint8(expected.astype(np.float64), float(expected.min()), float(expected.max())))


@pytest.mark.parametrize("size,ok", [((1, 1), False), ((31, 200), False), ((200, 31), False), ((32, 32), True)])
def test_minimum_size_per_side(size: tuple[int, int], ok: bool):
    pixels = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    for fmt in ("PNG", "JPEG"):
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format=fmt)
        if ok:
            assert read_image(out.getvalue()).pixels.shape == size
        else:
            assert _reason(out.getvalue()) == "too_small", fmt
    assert _reason(_png_of((8, 8))) == "too_small"
    assert read_image(_png_of((8, 8)), limits=ImageLimits(min_side=8)).pixels.shape == (8, 8)  # configurable


def _png_of(size) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros(size, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_dicom_bits_stored_zero_is_unsupported_bits_and_tiny_dicom_too_small(dicom_dir: Path):
    import pydicom

    nih = pydicom.dcmread(dicom_dir / NIH, force=True)
    zero = copy.deepcopy(nih)
    zero.BitsStored = 0
    out = io.BytesIO()
    zero.save_as(out, enforce_file_format=False)
    assert _reason(out.getvalue()) == "unsupported_bits"
    tiny = copy.deepcopy(nih)
    tiny.Rows = tiny.Columns = 1
    tiny.PixelData = b"\x00\x00"
    out = io.BytesIO()
    tiny.save_as(out, enforce_file_format=False)
    assert _reason(out.getvalue()) == "too_small"
