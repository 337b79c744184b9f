"""The one image reader (cxr.imaging / cxr.dicom) on real radiographs and on a corpus of malformed inputs."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr.imaging import (
    DEFAULT_IMAGE_SIZE,
    ImageError,
    ImageLimits,
    load_for_model,
    read_image,
    read_image_file,
    resize_for_model,
)
from tests.cxr import corpus

# damaged inputs make pydicom and PIL warn on their way to the refusal we assert: expected, not noise to show
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
MONOCHROME1 = {"CR-MONO1-10-chest.dcm", "Fake_MONOHR1.dcm", "RG1_J2KI.dcm"}


def _dicom_bytes(ds) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def test_every_real_dicom_decodes_to_its_header_size(dicom_dir: Path):
    files = sorted(dicom_dir.rglob("*.dcm"))
    assert len(files) == 7, "the shared DICOM set has 7 files (see its README)"
    for path in files:
        decoded = read_image_file(path)
        header = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        assert decoded.format == "dicom"
        assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (header.Rows, header.Columns), path.name
        assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255, f"{path.name}: full 8-bit range expected"
        assert ("MONOCHROME1 inverted" in decoded.notices) == (path.name in MONOCHROME1), path.name


def test_monochrome1_tag_is_honoured(dicom_dir: Path):
    """Fake_MONOHR1 is the SIIM file with only PhotometricInterpretation changed: its pixels must be the inverse."""
    siim = read_image_file(dicom_dir / corpus.SIIM_JPEG).pixels.astype(int)
    fake = read_image_file(dicom_dir / "Fake_MONOHR1.dcm").pixels.astype(int)
    assert np.array_equal(fake, 255 - siim)


def test_rle_and_uncompressed_16_bit_decode_identically(dicom_dir: Path):
    explicit = read_image_file(dicom_dir / corpus.EXPLICIT16)
    rle = read_image_file(dicom_dir / corpus.RLE)
    assert np.array_equal(explicit.pixels, rle.pixels)
    assert "DICOM VOI LUT/window applied" in explicit.notices


def test_file_without_preamble_or_meta(dicom_dir: Path):
    data = (dicom_dir / corpus.NO_PREAMBLE).read_bytes()
    assert data[128:132] != b"DICM"
    decoded = read_image(data)
    assert decoded.pixels.shape == (440, 440) and "MONOCHROME1 inverted" in decoded.notices


def test_jpeg2000_lossless_roundtrip_of_15_bit_data(dicom_dir: Path):
    """Compress the real 15-bit radiograph with JPEG 2000 lossless: decoding gives the same pixels."""
    ds = pydicom.dcmread(dicom_dir / corpus.EXPLICIT16)
    reference = read_image(_dicom_bytes(ds)).pixels
    ds.compress(pydicom.uid.JPEG2000Lossless)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(read_image(_dicom_bytes(ds)).pixels, reference)


@pytest.mark.parametrize("bits", [10, 12, 16])
def test_10_to_16_bit_monochrome2_without_window_spans_the_range(dicom_dir: Path, bits: int):
    base = pydicom.dcmread(dicom_dir / corpus.EXPLICIT16)
    raw = base.pixel_array.astype(np.float64)
    scaled = np.rint((raw - raw.min()) / (raw.max() - raw.min()) * (2**bits - 1)).astype(np.uint16)
    ds = copy.deepcopy(base)
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelData = scaled.tobytes()
    decoded = read_image(_dicom_bytes(ds))
    expected = np.rint(scaled.astype(np.float64) * 255.0 / scaled.max()).astype(np.uint8)
    assert np.abs(decoded.pixels.astype(int) - expected.astype(int)).max() <= 1


def test_monochrome1_inversion_of_a_16_bit_file(dicom_dir: Path):
    ds = pydicom.dcmread(dicom_dir / corpus.EXPLICIT16)
    mono2 = read_image(_dicom_bytes(ds)).pixels.astype(int)
    ds.PhotometricInterpretation = "MONOCHROME1"
    decoded = read_image(_dicom_bytes(ds))
    assert "MONOCHROME1 inverted" in decoded.notices
    assert np.array_equal(decoded.pixels.astype(int), 255 - mono2)


def test_dicom_header_facts_for_the_input_gate(dicom_dir: Path):
    ds = pydicom.dcmread(dicom_dir / corpus.NIH)
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.PatientAge = "DX", " CHEST ", "LL", "012Y"
    ds.PatientName = "Doe^Jane"  # never among the facts
    decoded = read_image(_dicom_bytes(ds))
    assert decoded.header == {"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "LL", "PatientAge": "012Y"}
    del ds.BodyPartExamined, ds.ViewPosition, ds.PatientAge
    assert read_image(_dicom_bytes(ds)).header == {"Modality": "DX"}  # only the facts present


def test_png_has_no_header_facts(cxr_raw_dir: Path):
    path = sorted((cxr_raw_dir / "Normal").glob("*.png"))[0]
    assert read_image(path.read_bytes()).header == {}


def test_unusable_window_falls_back_to_full_range(dicom_dir: Path):
    ds = pydicom.dcmread(dicom_dir / corpus.EXPLICIT16)
    ds.WindowWidth = 0
    decoded = read_image(_dicom_bytes(ds))
    assert "DICOM window unusable: ignored, full pixel range used" in decoded.notices
    assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255


def test_png_8_and_16_bit_and_jpeg(cxr_raw_dir: Path):
    path = sorted((cxr_raw_dir / "Normal").glob("*.png"))[0]
    eight = read_image_file(path)
    assert eight.format == "png" and eight.pixels.dtype == np.uint8 and eight.notices == []
    original = np.asarray(Image.open(path).convert("L"))
    assert np.array_equal(eight.pixels, original)
    # the same pixels as a 16-bit PNG spanning the full range decode to the same 8-bit image
    stretched = (
        ((original.astype(np.float64) - original.min()) * 65535.0 / (original.max() - original.min()))
        .round()
        .astype(np.uint16)
    )
    buffer = io.BytesIO()
    Image.fromarray(stretched).save(buffer, format="PNG")
    sixteen = read_image(buffer.getvalue())
    expected = np.rint((original.astype(np.float64) - original.min()) * 255.0 / (original.max() - original.min()))
    assert np.abs(sixteen.pixels.astype(int) - expected.astype(int)).max() <= 1
    assert "16-bit image scaled to 8 bits" in sixteen.notices
    buffer = io.BytesIO()
    Image.fromarray(original).save(buffer, format="JPEG", quality=95)
    jpeg = read_image(buffer.getvalue())
    assert jpeg.format == "jpeg" and np.abs(jpeg.pixels.astype(int) - original.astype(int)).mean() < 2.0


def test_rgb_png_is_converted_with_a_notice(cxr_raw_dir: Path):
    gray = np.asarray(Image.open(sorted((cxr_raw_dir / "Normal").glob("*.png"))[0]).convert("L"))
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(buffer, format="PNG")
    decoded = read_image(buffer.getvalue())
    assert np.array_equal(decoded.pixels, gray) and "RGB image converted to grayscale" in decoded.notices


def test_declared_format_overrides_detection(cxr_raw_dir: Path):
    data = sorted((cxr_raw_dir / "Normal").glob("*.png"))[0].read_bytes()
    assert read_image(data, "png").format == "png"
    with pytest.raises(ImageError) as info:
        read_image(data, "dicom")
    assert info.value.reason in ("no_pixel_data", "corrupt")
    with pytest.raises(ImageError) as info:
        read_image(data, "tiff")
    assert info.value.reason == "unknown_format"


def test_malformed_corpus_is_refused_with_the_right_reason(dicom_dir: Path, cxr_raw_dir: Path):
    cases = corpus.build(dicom_dir, cxr_raw_dir)
    assert len(cases) >= 40
    limits = ImageLimits(max_bytes=8 * 1024 * 1024, max_pixels=corpus.PIXEL_LIMIT)
    wrong = []
    for case in cases:
        try:
            read_image(case.data, case.fmt, limits)
            wrong.append((case.name, "accepted"))
        except ImageError as exc:
            if exc.reason not in case.reasons:
                wrong.append((case.name, exc.reason, str(exc)))
            assert str(exc), case.name  # a message a person can act on
    assert not wrong


def test_byte_limit(cxr_raw_dir: Path):
    png = sorted((cxr_raw_dir / "Normal").glob("*.png"))[0].read_bytes()
    with pytest.raises(ImageError) as info:
        read_image(corpus.oversized(100_000, png), limits=ImageLimits(max_bytes=100_000))
    assert info.value.reason == "too_large" and "100000" in str(info.value)


def test_pixel_limit_applies_to_every_format(dicom_dir: Path, cxr_raw_dir: Path):
    limits = ImageLimits(max_pixels=200 * 200)
    for path in [
        dicom_dir / corpus.NIH,
        dicom_dir / corpus.SIIM_JPEG,
        dicom_dir / corpus.J2K,
        sorted((cxr_raw_dir / "Normal").glob("*.png"))[0],
    ]:
        with pytest.raises(ImageError) as info:
            read_image_file(path, limits)
        assert info.value.reason == "too_many_pixels", path.name


def test_pil_bomb_guard_is_aligned_with_our_limit():
    assert Image.MAX_IMAGE_PIXELS == ImageLimits().max_pixels


def test_resize_and_load_for_model(dicom_dir: Path):
    pixels = read_image_file(dicom_dir / corpus.J2K).pixels
    resized = resize_for_model(pixels, 64)
    assert resized.shape == (64, 64) and resized.dtype == np.uint8
    assert np.array_equal(load_for_model(dicom_dir / corpus.J2K, 64), resized)
    assert load_for_model((dicom_dir / corpus.NIH).read_bytes()).shape == (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)


def test_large_images_are_reduced_before_the_resize_within_a_few_grey_levels(dicom_dir: Path, cxr_raw_dir: Path):
    """1024 px and larger: box-reduced first (reducing_gap), close to the full antialiased filter; images under 4x
    the model's side, like the training data, get exactly the full filter."""

    def full_filter(pixels: np.ndarray, size: int) -> np.ndarray:
        return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))

    for name in (corpus.NIH, corpus.J2K):
        big = read_image_file(dicom_dir / name).pixels
        diff = np.abs(resize_for_model(big).astype(int) - full_filter(big, DEFAULT_IMAGE_SIZE))
        assert 0 < diff.max() <= 8 and diff.mean() < 0.5, name
    for path in sorted((cxr_raw_dir / "Normal").glob("*.png"))[::25]:
        pixels = read_image_file(path).pixels
        assert np.array_equal(resize_for_model(pixels), full_filter(pixels, DEFAULT_IMAGE_SIZE)), path.name


def test_damaged_files_give_an_image_or_an_image_error_never_anything_else(dicom_dir: Path, cxr_raw_dir: Path):
    """Fuzzing with damaged real files: no decoder exception (or Rust panic) escapes the reader."""
    files = sorted(dicom_dir.rglob("*.dcm")) + sorted((cxr_raw_dir / "Normal").glob("*.png"))[:2]
    limits = ImageLimits(max_pixels=corpus.PIXEL_LIMIT)
    outcomes = {"decoded": 0, "refused": 0}
    for name, data in corpus.mutations(files, per_file=40, seed=1):
        try:
            decoded = read_image(data, limits=limits)
            assert decoded.pixels.dtype == np.uint8 and decoded.pixels.ndim == 2, name
            outcomes["decoded"] += 1
        except ImageError as exc:
            assert exc.reason and str(exc), name
            outcomes["refused"] += 1
    assert outcomes["decoded"] and outcomes["refused"], (
        outcomes
    )  # the damage is neither always fatal nor always harmless


def test_signed_16_bit_with_rescale(dicom_dir: Path):
    """Signed pixels (PixelRepresentation 1) with a modality rescale, as CT-like exports write them."""
    base = pydicom.dcmread(dicom_dir / corpus.EXPLICIT16)
    raw = base.pixel_array.astype(np.int32)
    signed = (raw - 16384).astype(np.int16)  # values both sides of zero
    ds = copy.deepcopy(base)
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 16, 15
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-100"
    ds.PixelData = signed.tobytes()
    decoded = read_image(_dicom_bytes(ds))
    values = signed.astype(np.float64) * 2 - 100
    expected = np.rint((values - values.min()) * 255.0 / (values.max() - values.min())).astype(np.uint8)
    assert np.array_equal(decoded.pixels, expected)
