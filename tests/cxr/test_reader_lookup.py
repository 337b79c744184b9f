"""The lookup-table path of the reader (issue 11) gives the same pixels, bit for bit, as the float64 formula it
replaced (tests/cxr/float_reference.py), on DICOMs and PNGs generated from real radiographs: 8/16-bit, signed,
unused high bits holding garbage, rescale slope/intercept, windows (LINEAR, LINEAR_EXACT, SIGMOID, several),
VOI and modality LUT sequences, MONOCHROME1, constant images, unusable windows, compressed syntaxes."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from cxr.imaging import lookup_to_uint8, read_image
from tests.cxr import corpus
from tests.cxr.float_reference import float_dicom_pixels, float_png16_pixels

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SIDE = 384  # crops of the real images: big enough for thousands of distinct values, quick in float64


@pytest.fixture(scope="module")
def base(dicom_dir: Path) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """The real 15-bit radiograph's dataset and a crop of its pixels, and a crop of the real 8-bit NIH image."""
    ds = pydicom.dcmread(dicom_dir / corpus.EXPLICIT16)
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "RescaleType"):
        if keyword in ds:
            delattr(ds, keyword)
    fifteen = ds.pixel_array[200 : 200 + SIDE, 200 : 200 + SIDE].astype(np.int64)
    eight = pydicom.dcmread(dicom_dir / corpus.NIH).pixel_array[300 : 300 + SIDE, 300 : 300 + SIDE]
    return ds, fifteen, eight.astype(np.int64)


def _dicom(base_ds: Dataset, words: np.ndarray, allocated: int, stored: int, signed: bool, **attrs) -> bytes:
    """A DICOM of `words` (the stored words, garbage in any unused bits included) with the attributes given."""
    ds = copy.deepcopy(base_ds)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, stored, stored - 1, int(signed)
    ds.Rows, ds.Columns = words.shape
    ds.PixelData = words.astype(f"<{'iu'[not signed]}{allocated // 8}").tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _scaled(values: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Real pixels stretched to the range of `bits` bits (signed: both sides of zero)."""
    span = values.max() - values.min()
    out = np.rint((values - values.min()) * (2**bits - 1) / span).astype(np.int64)
    return out - 2 ** (bits - 1) if signed else out


def _with_garbage_high_bits(values: np.ndarray, allocated: int, stored: int, seed: int = 0) -> np.ndarray:
    """Two's complement words of `values` in `stored` bits, the unused bits above them random (PS3.5 8.1.1 says
    nothing about their content; pydicom clears them, and so must the reader)."""
    rng = np.random.default_rng(seed)
    low = values & ((1 << stored) - 1)
    garbage = rng.integers(0, 1 << (allocated - stored), values.shape) << stored if allocated > stored else 0
    words = (low | garbage).astype(np.int64)
    return words.astype(f"u{allocated // 8}")


def _lut_item(first_map: int, data: list[int], depth: int = 16) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(data), first_map, depth]
    item.add_new(0x00283006, "US", data)  # LUTData
    return item


def _cases(base_ds: Dataset, fifteen: np.ndarray, eight: np.ndarray) -> dict[str, bytes]:
    u12, s12 = _scaled(fifteen, 12, False), _scaled(fifteen, 12, True)
    u16, s16 = _scaled(fifteen, 16, False), _scaled(fifteen, 16, True)
    rng = np.random.default_rng(3)
    bumpy = [int(v) for v in np.clip(np.cumsum(rng.integers(-30, 60, 3000)), 0, 65535)]  # a non-monotone LUT
    d = _dicom
    return {
        "8-bit as stored": d(base_ds, eight, 8, 8, False),
        "8-bit MONOCHROME1": d(base_ds, eight, 8, 8, False, PhotometricInterpretation="MONOCHROME1"),
        "8-bit, 7 stored, garbage bit": d(base_ds, _with_garbage_high_bits(eight // 2, 8, 7), 8, 7, False),
        "8-bit signed with window": d(base_ds, _scaled(eight, 8, True), 8, 8, True, WindowCenter=-10, WindowWidth=120),
        "8-bit rescale + window": d(
            base_ds, eight, 8, 8, False, RescaleSlope=3, RescaleIntercept=-200, WindowCenter=150, WindowWidth=300
        ),
        "12-bit no window": d(base_ds, u12, 16, 12, False),
        "12-bit garbage high bits, window": d(
            base_ds, _with_garbage_high_bits(u12, 16, 12), 16, 12, False, WindowCenter=2048, WindowWidth=4096
        ),
        "12-bit narrow window MONOCHROME1": d(
            base_ds, u12, 16, 12, False, WindowCenter=1800, WindowWidth=700, PhotometricInterpretation="MONOCHROME1"
        ),
        "12-bit rescale slope/intercept + window": d(
            base_ds, u12, 16, 12, False, RescaleSlope=0.5, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=1500
        ),
        "12-bit negative slope": d(base_ds, u12, 16, 12, False, RescaleSlope=-1.25, RescaleIntercept=3000),
        "12-bit signed, garbage high bits, rescale": d(
            base_ds,
            _with_garbage_high_bits(s12, 16, 12, seed=1),
            16,
            12,
            True,
            RescaleSlope=2,
            RescaleIntercept=-100,
        ),
        "16-bit full range": d(base_ds, u16, 16, 16, False),
        "16-bit signed window": d(base_ds, s16, 16, 16, True, WindowCenter=-5000, WindowWidth=30000),
        "15-bit SIGMOID": d(
            base_ds, fifteen, 16, 15, False, WindowCenter=12000, WindowWidth=9000, VOILUTFunction="SIGMOID"
        ),
        "15-bit LINEAR_EXACT": d(
            base_ds, fifteen, 16, 15, False, WindowCenter=12000.5, WindowWidth=0.75, VOILUTFunction="LINEAR_EXACT"
        ),
        "15-bit two windows (the first applies)": d(
            base_ds, fifteen, 16, 15, False, WindowCenter=[14000, 9000], WindowWidth=[6000, 20000]
        ),
        "15-bit unusable window (width 0)": d(base_ds, fifteen, 16, 15, False, WindowCenter=14000, WindowWidth=0),
        "15-bit VOI LUT sequence, non-monotone": d(
            base_ds, fifteen, 16, 15, False, VOILUTSequence=Sequence([_lut_item(int(fifteen.min()) + 500, bumpy)])
        ),
        "12-bit modality LUT then window": d(
            base_ds,
            u12,
            16,
            12,
            False,
            ModalityLUTSequence=Sequence([_lut_item(100, [int(v) * 3 for v in range(4000)])]),
            WindowCenter=6000,
            WindowWidth=4000,
        ),
        "constant 16-bit": d(base_ds, np.full((64, 64), 1234), 16, 12, False),
        "constant 8-bit MONOCHROME1": d(
            base_ds, np.full((64, 64), 7), 8, 8, False, PhotometricInterpretation="MONOCHROME1"
        ),
    }


def test_dicom_lookup_path_is_bit_identical_to_the_float_formula(base):
    wrong = {}
    for name, data in _cases(*base).items():
        new, old = read_image(data).pixels, float_dicom_pixels(data)
        assert new.shape == old.shape and new.dtype == old.dtype == np.uint8, name
        if not np.array_equal(new, old):
            wrong[name] = int(np.abs(new.astype(int) - old.astype(int)).max())
    assert not wrong, wrong


def test_cases_exercise_what_they_claim(base):
    """The cases are not trivial: garbage bits are there to clear, windows clip, and the LUT sequence is applied."""
    cases = _cases(*base)
    ds = pydicom.dcmread(io.BytesIO(cases["12-bit garbage high bits, window"]))
    raw = np.frombuffer(ds.PixelData, dtype="<u2")
    assert (raw >> 12).any() and not (ds.pixel_array >> 12).any()
    signed = pydicom.dcmread(io.BytesIO(cases["12-bit signed, garbage high bits, rescale"])).pixel_array
    assert signed.min() < 0 < signed.max()
    narrow = read_image(cases["12-bit narrow window MONOCHROME1"]).pixels
    assert (narrow == 0).mean() > 0.01 and (narrow == 255).mean() > 0.01  # clipped at both ends
    assert "DICOM VOI LUT/window applied" in read_image(cases["15-bit VOI LUT sequence, non-monotone"]).notices
    unusable = read_image(cases["15-bit unusable window (width 0)"]).notices
    assert "DICOM window unusable: ignored, full pixel range used" in unusable
    assert not read_image(cases["constant 16-bit"]).pixels.any()
    assert (read_image(cases["constant 8-bit MONOCHROME1"]).pixels == 255).all()


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless", "DeflatedExplicitVRLittleEndian"])
def test_compressed_and_deflated_syntaxes_match_the_float_formula(base, syntax: str):
    """Pixels that pydicom decodes (not read in place) take the same lookup-table path."""
    base_ds, fifteen, _ = base
    ds = pydicom.dcmread(io.BytesIO(_dicom(base_ds, _scaled(fifteen, 12, False), 16, 12, False)))
    ds.WindowCenter, ds.WindowWidth = 1500, 2500
    uid = getattr(pydicom.uid, syntax)
    if uid.is_compressed:
        ds.compress(uid)
    else:
        ds.file_meta.TransferSyntaxUID = uid
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert np.array_equal(read_image(out.getvalue()).pixels, float_dicom_pixels(out.getvalue()))


def test_real_dicom_files_match_the_float_formula(dicom_dir: Path):
    for path in sorted(dicom_dir.rglob("*.dcm")):
        data = path.read_bytes()
        assert np.array_equal(read_image(data).pixels, float_dicom_pixels(data)), path.name


def test_16_bit_png_matches_the_float_formula(base):
    _, fifteen, _ = base
    for values in (_scaled(fifteen, 16, False), _scaled(fifteen, 10, False) + 3000, np.full((64, 64), 513)):
        buffer = io.BytesIO()
        Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")
        decoded = read_image(buffer.getvalue())
        assert np.array_equal(decoded.pixels, float_png16_pixels(buffer.getvalue()))
        assert "16-bit image scaled to 8 bits" in decoded.notices


@pytest.mark.parametrize("dtype", ["uint8", "int8", "<u2", "<i2", ">u2", ">i2"])
def test_lookup_equals_the_mapping_over_the_whole_image(dtype: str):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(5)
    pixels = rng.integers(info.min, info.max, (97, 131), endpoint=True).astype(dtype)
    pixels[0, :3] = info.min, info.max, 0  # the extremes of the dtype index the table correctly
    seen = []

    def mapping(values: np.ndarray) -> np.ndarray:
        seen.append(values.size)
        return ((values.astype(np.float64) * 7 - 3) % 256).astype(np.uint8)

    assert np.array_equal(lookup_to_uint8(pixels, mapping), mapping(pixels))
    assert seen[0] == np.unique(pixels).size  # evaluated once per distinct value, no more


def test_lookup_refuses_what_a_table_cannot_hold():
    for pixels in (np.zeros((4, 4), np.int32), np.zeros((4, 4), np.float32)):
        with pytest.raises(TypeError):
            lookup_to_uint8(pixels, lambda v: v.astype(np.uint8))
