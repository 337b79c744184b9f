"""A corpus of malformed images, generated from the real files in ../shared/data (never stored).

Each case is bytes plus what must happen: the gRPC status code the gateway answers with and the reader's
reason codes that are acceptable. Used by the reader's unit tests (tests/gateway) and the end-to-end
tests through a real gateway (tests/e2e).
"""

from __future__ import annotations

import copy
import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

INVALID = TOO_LARGE = "INVALID_ARGUMENT"  # images beyond the byte/pixel limits are refused like any unreadable one
NIH = "nih_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"
SIIM_JPEG = "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
J2K = "RG1_J2KI.dcm"
NO_PREAMBLE = "CR-MONO1-10-chest.dcm"
EXPLICIT16 = "derived/RG1_derived_MONO2_15bit_ExplicitVRLE.dcm"
RLE = "derived/RG1_derived_MONO2_15bit_RLELossless.dcm"
# The pixel limit the corpus is built around (the reader's limits in the tests must not exceed it).
PIXEL_LIMIT = 40_000_000


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    code: str  # gRPC status code name the gateway must answer with
    reasons: tuple[str, ...]  # acceptable reader reason codes
    fmt: str | None = None  # format the caller declares (None: detected)


def _dicom_bytes(ds) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A real decompression bomb: a valid grayscale PNG of width x height zeros, compressed to a few KB."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    parts = [compressor.compress(row) for _ in range(height)]
    idat = b"".join(parts) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _with_sof_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A JPEG whose SOF marker claims another size (the entropy-coded data is unchanged)."""
    pos = 2
    data = bytearray(jpeg)
    while pos < len(data):
        marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        pos += 2 + length
    raise ValueError("no SOF marker")


def _flip(data: bytes, offset: int, mask: int = 0xFF) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def _encapsulated(ds, frames: list[bytes], syntax) -> bytes:
    from pydicom.encaps import encapsulate

    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _dicom_bytes(ds)


def build(dicom_dir: Path, cxr_raw_dir: Path) -> list[Case]:
    import pydicom
    from pydicom.uid import JPEGBaseline8Bit

    def read(name: str):
        return pydicom.dcmread(dicom_dir / name, force=True)

    nih_bytes = (dicom_dir / NIH).read_bytes()
    explicit_bytes = (dicom_dir / EXPLICIT16).read_bytes()
    jpeg_dcm = (dicom_dir / SIIM_JPEG).read_bytes()
    j2k_dcm = (dicom_dir / J2K).read_bytes()
    rle_dcm = (dicom_dir / RLE).read_bytes()
    no_preamble = (dicom_dir / NO_PREAMBLE).read_bytes()
    nih = read(NIH)
    pixels = nih.pixel_array.astype(np.uint8)  # real 1024x1024 chest radiograph
    small = np.asarray(Image.fromarray(pixels).resize((256, 256)), dtype=np.uint8)
    png_path = sorted((cxr_raw_dir / "Normal").glob("*.png"))[0]
    png_bytes = png_path.read_bytes()
    png16 = io.BytesIO()
    Image.fromarray(small.astype(np.uint16) * 257).save(png16, format="PNG")
    png16_bytes = png16.getvalue()
    jpeg_bytes = _jpeg(small)

    cases: list[Case] = []

    def add(name, data, code, *reasons, fmt=None):
        cases.append(Case(name, data, code, tuple(reasons), fmt))

    # ---- nothing usable at all
    add("empty", b"", INVALID, "empty")
    add("one_byte", b"\x00", INVALID, "unknown_format")
    add(
        "random_bytes",
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        INVALID,
        "unknown_format",
        "corrupt",
    )
    add("plain_text", b"this is not an image, it is a note about a patient\n" * 20, INVALID, "unknown_format")
    add("pdf", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n", INVALID, "unknown_format")
    gif = io.BytesIO()
    Image.fromarray(small).save(gif, format="GIF")
    add("gif", gif.getvalue(), INVALID, "unknown_format")
    add("dicm_magic_only", b"\x00" * 128 + b"DICM", INVALID, "no_pixel_data", "corrupt", "truncated")

    # ---- DICOM: truncated and corrupted real files
    add("dicom_implicit_truncated_half", nih_bytes[: len(nih_bytes) // 2], INVALID, "truncated")
    add("dicom_implicit_truncated_99pct", nih_bytes[: len(nih_bytes) * 99 // 100], INVALID, "truncated")
    add("dicom_explicit16_truncated_half", explicit_bytes[: len(explicit_bytes) // 2], INVALID, "truncated")
    add("dicom_header_only", nih_bytes[:600], INVALID, "no_pixel_data", "truncated", "corrupt")
    add("dicom_no_preamble_truncated", no_preamble[: len(no_preamble) * 6 // 10], INVALID, "truncated")
    add("dicom_jpeg_truncated", jpeg_dcm[: len(jpeg_dcm) * 7 // 10], INVALID, "truncated", "corrupt")
    add("dicom_j2k_truncated", j2k_dcm[: len(j2k_dcm) // 2], INVALID, "truncated", "corrupt")
    add("dicom_rle_truncated", rle_dcm[: len(rle_dcm) // 2], INVALID, "truncated", "corrupt")
    add("dicom_magic_flipped", _flip(nih_bytes, 128), INVALID, "unknown_format")
    jpeg_frame = pydicom.encaps.generate_frames(read(SIIM_JPEG).PixelData, number_of_frames=1).__next__()
    garbage = np.random.default_rng(1).integers(0, 256, len(jpeg_frame), dtype=np.uint8).tobytes()
    add("dicom_jpeg_garbage_frame", _encapsulated(read(SIIM_JPEG), [garbage], JPEGBaseline8Bit), INVALID, "corrupt")
    broken = bytearray(jpeg_frame)
    broken[200:4000] = b"\x00" * 3800  # wipe the Huffman tables and the start of the scan
    add(
        "dicom_jpeg_frame_cut_third",
        _encapsulated(read(SIIM_JPEG), [jpeg_frame[: len(jpeg_frame) // 3]], JPEGBaseline8Bit),
        INVALID,
        "truncated",
    )
    add(
        "dicom_jpeg_wiped_tables", _encapsulated(read(SIIM_JPEG), [bytes(broken)], JPEGBaseline8Bit), INVALID, "corrupt"
    )

    # ---- DICOM: what we refuse by design
    rgb = copy.deepcopy(nih)
    rgb.PhotometricInterpretation, rgb.SamplesPerPixel, rgb.PlanarConfiguration = "RGB", 3, 0
    rgb.PixelData = np.repeat(small[..., None], 3, axis=2).tobytes()
    rgb.Rows, rgb.Columns = small.shape
    add("dicom_rgb", _dicom_bytes(rgb), INVALID, "not_grayscale")
    ybr = copy.deepcopy(rgb)
    ybr.PhotometricInterpretation = "YBR_FULL"
    add("dicom_ybr_full", _dicom_bytes(ybr), INVALID, "not_grayscale")
    palette = copy.deepcopy(nih)
    palette.PhotometricInterpretation = "PALETTE COLOR"
    add("dicom_palette_color", _dicom_bytes(palette), INVALID, "not_grayscale")
    no_photometric = copy.deepcopy(nih)
    del no_photometric.PhotometricInterpretation
    add("dicom_no_photometric", _dicom_bytes(no_photometric), INVALID, "not_grayscale")
    multi = copy.deepcopy(nih)
    multi.Rows, multi.Columns, multi.NumberOfFrames = 256, 256, 3
    multi.PixelData = np.stack([small] * 3).tobytes()
    add("dicom_multi_frame", _dicom_bytes(multi), INVALID, "multi_frame")
    no_pixels = copy.deepcopy(nih)
    del no_pixels.PixelData
    add("dicom_no_pixel_data", _dicom_bytes(no_pixels), INVALID, "no_pixel_data")
    bits32 = copy.deepcopy(nih)
    bits32.Rows, bits32.Columns, bits32.BitsAllocated, bits32.BitsStored, bits32.HighBit = 256, 256, 32, 32, 31
    bits32.PixelData = small.astype(np.uint32).tobytes()
    add("dicom_32_bits", _dicom_bytes(bits32), INVALID, "unsupported_bits")
    bits12 = copy.deepcopy(nih)
    bits12.BitsAllocated, bits12.BitsStored, bits12.HighBit = 12, 12, 11
    add("dicom_12_bits_allocated", _dicom_bytes(bits12), INVALID, "unsupported_bits")
    stored_over = copy.deepcopy(nih)
    stored_over.BitsStored = 12  # more bits stored than allocated (8)
    add("dicom_bits_stored_over_allocated", _dicom_bytes(stored_over), INVALID, "unsupported_bits")
    zero_rows = copy.deepcopy(nih)
    zero_rows.Rows = 0
    add("dicom_zero_rows", _dicom_bytes(zero_rows), INVALID, "corrupt")
    no_columns = copy.deepcopy(nih)
    del no_columns.Columns
    add("dicom_no_columns", _dicom_bytes(no_columns), INVALID, "corrupt")
    short = copy.deepcopy(nih)
    short.Rows = 2048  # header says twice the rows the pixel data holds
    add("dicom_pixel_data_shorter_than_header", _dicom_bytes(short), INVALID, "truncated")
    unknown_syntax = copy.deepcopy(nih)
    unknown_syntax.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
    add("dicom_unknown_transfer_syntax", _dicom_bytes(unknown_syntax), INVALID, "unsupported_transfer_syntax")
    # native pixel data under a compressed transfer syntax: written as Explicit VR LE, then relabelled RLE
    # (both UIDs are 20 bytes padded, so the file meta stays consistent)
    native = copy.deepcopy(nih)
    native.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    relabelled = _dicom_bytes(native).replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.5\x00", 1)
    add("dicom_native_data_labelled_rle", relabelled, INVALID, "corrupt", "truncated", "no_pixel_data")
    nan_slope = copy.deepcopy(nih)
    with warnings.catch_warnings():  # pydicom warns that NaN is not a valid DS: that is the point
        warnings.simplefilter("ignore")
        nan_slope.RescaleSlope, nan_slope.RescaleIntercept = "NaN", "0"
    add("dicom_nan_rescale_slope", _dicom_bytes(nan_slope), INVALID, "corrupt")

    # ---- DICOM: size limits and bombs
    huge_header = copy.deepcopy(nih)
    huge_header.Rows, huge_header.Columns = 60000, 60000
    add("dicom_header_60000x60000", _dicom_bytes(huge_header), TOO_LARGE, "too_many_pixels")
    big = np.zeros((8000, 8000), dtype=np.uint8)  # 64 Mpixel uniform JPEG: a few hundred KB
    bomb_frame = _jpeg(big, quality=50)
    del big
    bomb = copy.deepcopy(nih)
    bomb.Rows, bomb.Columns = 64, 64  # the header lies; the codestream is the bomb
    add(
        "dicom_jpeg_bomb_8000x8000_in_64x64",
        _encapsulated(bomb, [bomb_frame], JPEGBaseline8Bit),
        TOO_LARGE,
        "too_many_pixels",
    )
    mismatch = copy.deepcopy(nih)
    mismatch.Rows, mismatch.Columns = 512, 512
    add("dicom_jpeg_size_mismatch", _encapsulated(mismatch, [jpeg_frame], JPEGBaseline8Bit), INVALID, "corrupt")

    # ---- PNG
    add("png_truncated_half", png_bytes[: len(png_bytes) // 2], INVALID, "truncated", "corrupt")
    add("png_signature_and_ihdr_only", png_bytes[:33], INVALID, "truncated", "corrupt")
    add("png_ihdr_crc_flipped", _flip(png_bytes, 29), INVALID, "corrupt", "truncated")
    add("png_idat_flipped", _flip(png_bytes, len(png_bytes) // 2), INVALID, "corrupt", "truncated")
    add("png_bad_signature", _flip(png_bytes, 1), INVALID, "unknown_format")
    zero_width = (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 256, 8, 0, 0, 0, 0)) + _chunk(b"IEND", b"")
    )
    add("png_zero_width", zero_width, INVALID, "corrupt")
    add("png16_truncated", png16_bytes[: len(png16_bytes) * 2 // 3], INVALID, "truncated", "corrupt")
    add("png_bomb_8000x8000", png_bomb(8000, 8000), TOO_LARGE, "too_many_pixels")
    bomb_header = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0))
    add("png_bomb_header_40000x40000", bomb_header + _chunk(b"IEND", b""), TOO_LARGE, "too_many_pixels")
    add("png_declared_jpeg", png_bytes, INVALID, "corrupt", fmt="jpeg")

    # ---- JPEG
    add("jpeg_truncated_half", jpeg_bytes[: len(jpeg_bytes) // 2], INVALID, "truncated", "corrupt")
    add("jpeg_soi_only", jpeg_bytes[:20], INVALID, "truncated", "corrupt")
    add("jpeg_sof_claims_60000x60000", _with_sof_size(jpeg_bytes, 60000, 60000), TOO_LARGE, "too_many_pixels")
    wiped = bytearray(jpeg_bytes)
    wiped[20:600] = b"\x00" * 580
    add("jpeg_wiped_tables", bytes(wiped), INVALID, "corrupt", "truncated")
    add("dicom_declared_png", nih_bytes, INVALID, "corrupt", fmt="png")

    # ---- strict decode (issue 10): damaged entropy-coded data, images too small to read, BitsStored 0
    add("jpeg_200_bytes_zeroed_mid_stream", zeroed_mid_stream(jpeg_bytes), INVALID, "corrupt")
    add(
        "dicom_jpeg_200_bytes_zeroed_mid_stream",
        _encapsulated(read(SIIM_JPEG), [zeroed_mid_stream(jpeg_frame)], JPEGBaseline8Bit),
        INVALID,
        "corrupt",
    )
    add("png_1x1", _png(np.zeros((1, 1), dtype=np.uint8)), INVALID, "too_small")
    add("jpeg_31x256", _jpeg(small[:31]), INVALID, "too_small")
    tiny = copy.deepcopy(nih)
    tiny.Rows, tiny.Columns = 16, 16
    tiny.PixelData = small[:16, :16].tobytes()
    add("dicom_16x16", _dicom_bytes(tiny), INVALID, "too_small")
    stored_zero = copy.deepcopy(nih)
    stored_zero.BitsStored = 0
    add("dicom_bits_stored_0", _dicom_bytes(stored_zero), INVALID, "unsupported_bits")
    return cases


def zeroed_mid_stream(jpeg: bytes, count: int = 200) -> bytes:
    """A JPEG with `count` bytes zeroed in the middle of its entropy-coded data: libjpeg decodes it into garbage
    with only a "Corrupt JPEG data" warning."""
    out = bytearray(jpeg)
    middle = len(out) // 2
    out[middle : middle + count] = b"\x00" * count
    return bytes(out)


def oversized(limit_bytes: int, png_bytes: bytes) -> bytes:
    """A valid PNG followed by padding so the whole is beyond `limit_bytes` (the reader's byte limit)."""
    return png_bytes + b"\x00" * (limit_bytes + 1 - len(png_bytes))


def mutations(files: list[Path], per_file: int, seed: int = 0):
    """Randomly damaged copies of real files: a few bytes of the first 3 KB (the headers) overwritten, and a
    third of them also cut short. Yields (file name, bytes); the outcome is not known in advance."""
    rng = np.random.default_rng(seed)
    for path in files:
        data = path.read_bytes()
        for _ in range(per_file):
            damaged = bytearray(data)
            for _ in range(int(rng.integers(1, 8))):
                damaged[int(rng.integers(0, min(len(damaged), 3000)))] = int(rng.integers(0, 256))
            if rng.random() < 0.3:
                damaged = damaged[: int(rng.integers(1, len(damaged)))]
            yield path.name, bytes(damaged)
