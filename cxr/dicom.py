"""DICOM to 8-bit grayscale: rescale, then VOI LUT or window, then MONOCHROME1 inversion.

Everything that could make the decoder misbehave is checked from the header first (one grayscale frame,
supported bit depth and transfer syntax, pixel count within limits, pixel data long enough, and for
compressed data the frame size the codestream itself declares), so a hostile file is refused before
any large buffer is allocated.
"""

from __future__ import annotations

import io
import struct

import numpy as np

from cxr.imaging import (
    DecodedImage,
    ImageError,
    ImageLimits,
    _to_uint8,
    check_min_size,
    lookup_to_uint8,
    strict_jpeg,
)

# ViewPosition values (DICOM CS) that mean a lateral projection; our models were trained on frontal views.
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLD", "RLD", "LL_DECUBITUS", "RL_DECUBITUS"}
# Header facts returned with the pixels (DecodedImage.header) for the gateway's input gate to judge.
HEADER_FACTS = ("Modality", "BodyPartExamined", "ViewPosition", "PatientAge")
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian


def _pydicom():
    import pydicom

    # Never validate element values while reading: validation warnings quote the values (names, birth
    # dates) into logs, and a malformed value in a tag we do not use must not refuse the image.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


def read_dicom(data: bytes, limits: ImageLimits) -> DecodedImage:
    """Decode one DICOM image. Every failure is an ImageError: a hostile file never escapes as another error."""
    try:
        return _read_dicom(data, limits)
    except ImageError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except MemoryError:
        raise ImageError("too_many_pixels", "DICOM image needs more memory than is available to decode") from None
    except BaseException as exc:  # noqa: BLE001 - Rust decoders (pyo3) panic with a BaseException on some corrupt data
        raise ImageError("corrupt", f"DICOM is malformed: {_short(exc)}") from None


def _read_dicom(data: bytes, limits: ImageLimits) -> DecodedImage:
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        ds.get("PixelData")  # parse up to and including the pixel data now, so truncation shows here
    except Exception as exc:
        raise _parse_error(exc) from None
    if "PixelData" not in ds:
        if _PIXEL_DATA_TAG in data:  # the element starts but was cut off (pydicom drops it at end of file)
            raise ImageError("truncated", "DICOM file is truncated inside the pixel data")
        raise ImageError("no_pixel_data", "DICOM has no pixel data (PixelData element missing): nothing to classify")
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        # ACR-NEMA style files without meta: the data is implicit VR little endian
        ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    _check_header(ds, limits)
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    if not transfer_syntax.is_transfer_syntax:
        raise ImageError(
            "unsupported_transfer_syntax",
            f"DICOM TransferSyntaxUID {str(transfer_syntax)[:64]!r} is not a known transfer syntax",
        )
    strict = None
    if transfer_syntax.is_compressed:
        frame = _check_codestream(ds, limits)
        if _is_jpeg8(frame):
            strict = strict_jpeg(frame)  # refuses corrupt entropy-coded data that the decoders below accept
    else:
        _check_native_length(ds)
    if transfer_syntax == pydicom.uid.JPEGBaseline8Bit:
        # Pillow refuses corrupt 8-bit JPEG; the fallback plugin (libjpeg) would decode it into garbage
        ds.pixel_array_options(decoding_plugin="pillow")
    elif transfer_syntax == pydicom.uid.RLELossless:
        # pydicom's own RLE decoder (the one used first anyway) refuses corrupt segments; without this,
        # pydicom falls back to pylibjpeg-rle, whose Rust code panics on some of them
        ds.pixel_array_options(decoding_plugin="pydicom")
    try:
        # the strict decode's pixels are the image when they need no reinterpretation (unsigned 8-bit)
        use_strict = strict is not None and _int(ds, "BitsAllocated") == 8 and _int(ds, "PixelRepresentation", 0) == 0
        if use_strict:
            arr, unused_bits = strict, 0
        elif (native := _native_words(ds)) is not None:
            arr, unused_bits = native
        else:
            arr, unused_bits = ds.pixel_array, 0  # pydicom has cleared the unused bits
    except ImageError:
        raise
    except Exception as exc:  # (a decoder panic is a BaseException: read_dicom turns it into "corrupt")
        raise ImageError("corrupt", f"cannot decode DICOM pixel data ({transfer_syntax.name}): {_short(exc)}") from None
    if arr.ndim != 2:
        raise ImageError("not_grayscale", f"DICOM pixel array has shape {arr.shape}: expected one grayscale frame")
    notices: list[str] = []
    # everything from the stored word to the display value depends on the word alone: computed once per distinct
    # word present, then looked up, instead of in float64 over every pixel
    pixels = lookup_to_uint8(arr, lambda words: _to_display(_clear_unused_bits(words, unused_bits), ds, notices))
    header = {k: v for k in HEADER_FACTS if (v := str(ds.get(k, "") or "").strip())}
    return DecodedImage(pixels=np.ascontiguousarray(pixels), format="dicom", notices=notices, header=header)


def _to_display(values: np.ndarray, ds, notices: list[str]) -> np.ndarray:
    """Stored pixel values to 8-bit display values: modality rescale, VOI LUT or window, the full range of what is
    left to 0..255, MONOCHROME1 inverted. Elementwise except for the range, taken over `values`."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        arr = apply_modality_lut(values, ds).astype(np.float64)
    except Exception as exc:
        raise ImageError(
            "corrupt", f"cannot apply the DICOM rescale (RescaleSlope/RescaleIntercept/LUT): {_short(exc)}"
        ) from None
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        try:
            windowed = apply_voi_lut(arr, ds).astype(np.float64)
        except Exception:
            windowed = None  # an unusable window (e.g. width 0): fall back to the full range below
        if windowed is not None and _finite(windowed):
            arr = windowed
            notices.append("DICOM VOI LUT/window applied")
        else:
            notices.append("DICOM window unusable: ignored, full pixel range used")
    if not _finite(arr):
        raise ImageError(
            "corrupt", "DICOM rescale produced non-finite pixel values (check RescaleSlope/RescaleIntercept)"
        )
    pixels = _to_uint8(arr, float(arr.min()), float(arr.max()))
    if str(ds.PhotometricInterpretation).upper() == "MONOCHROME1":
        pixels = 255 - pixels
        notices.append("MONOCHROME1 inverted")
    return pixels


def _native_words(ds) -> tuple[np.ndarray, int] | None:
    """Uncompressed little-endian pixel data as a view on the bytes (np.frombuffer), with the number of unused high
    bits in each word; None where pydicom must read it (compressed, big endian) or would refuse it (a required
    element missing, an invalid PixelRepresentation), so it is refused as before. The header checks are done by now.

    `ds.pixel_array` would copy the buffer and clear the unused bits of every pixel; here they are cleared once per
    distinct word (`_clear_unused_bits`), exactly as pydicom does it."""
    signed = ds.get("PixelRepresentation")
    required = ds.get("BitsStored") not in (None, "") and "SamplesPerPixel" in ds and signed in (0, 1)
    syntax = ds.file_meta.TransferSyntaxUID
    if not required or syntax.is_compressed or not syntax.is_little_endian:
        return None
    rows, cols, allocated, stored = (_int(ds, k) for k in ("Rows", "Columns", "BitsAllocated", "BitsStored"))
    dtype = np.dtype(f"<{'ui'[signed]}{allocated // 8}")  # pydicom's pixel dtype
    return np.frombuffer(ds.PixelData, dtype=dtype, count=rows * cols).reshape(rows, cols), allocated - stored


def _clear_unused_bits(words: np.ndarray, unused_bits: int) -> np.ndarray:
    """pydicom's correction of words with BitsStored < BitsAllocated: unused high bits cleared, signed values
    sign-extended (an arithmetic shift on the signed dtype)."""
    if not unused_bits:
        return words
    return np.right_shift(np.left_shift(words, unused_bits), unused_bits)


def _finite(arr: np.ndarray) -> bool:
    """No NaN or infinity anywhere (min and max carry both: one pass each instead of a boolean copy)."""
    return bool(np.isfinite(arr.min()) and np.isfinite(arr.max()))


def _parse_error(exc: Exception) -> ImageError:
    text = _short(exc)
    if isinstance(exc, EOFError) or "end of file" in text.lower() or "truncat" in text.lower():
        return ImageError("truncated", f"DICOM file is truncated: {text}")
    return ImageError("corrupt", f"cannot parse DICOM: {text}")


def _short(exc: Exception, limit: int = 200) -> str:
    """An exception as one short line (decoder messages can be long)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int(ds, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ImageError("corrupt", f"DICOM {keyword} is missing or not a number: cannot read the pixels") from None


def _check_header(ds, limits: ImageLimits) -> None:
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples != 1 or photometric not in GRAYSCALE:
        shown = photometric or "(missing)"
        raise ImageError(
            "not_grayscale",
            f"DICOM is not grayscale (PhotometricInterpretation {shown}, SamplesPerPixel {samples}): "
            "only MONOCHROME1 or MONOCHROME2 radiographs can be classified",
        )
    ds.PhotometricInterpretation = photometric
    frames = _int(ds, "NumberOfFrames", 1) if ds.get("NumberOfFrames") not in (None, "") else 1
    if frames != 1:
        raise ImageError(
            "multi_frame", f"multi-frame DICOM ({frames} frames) is not supported: send one frame per request"
        )
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows <= 0 or cols <= 0:
        raise ImageError("corrupt", f"DICOM image size {cols}x{rows} is invalid")
    if rows * cols > limits.max_pixels:
        raise ImageError("too_many_pixels", f"DICOM image is {cols}x{rows}; the limit is {limits.max_pixels} pixels")
    check_min_size(cols, rows, limits)
    allocated = _int(ds, "BitsAllocated")
    # BitsStored absent or empty: all allocated bits; present, it must be 1..allocated (0 is unsupported, not corrupt)
    stored = _int(ds, "BitsStored") if ds.get("BitsStored") not in (None, "") else allocated
    if allocated not in (8, 16) or not 1 <= stored <= allocated:
        raise ImageError(
            "unsupported_bits",
            f"DICOM with BitsAllocated {allocated} / BitsStored {stored} is not supported: expected 8 or 16 bits allocated",
        )


def _check_native_length(ds) -> None:
    rows, cols, bits = _int(ds, "Rows"), _int(ds, "Columns"), _int(ds, "BitsAllocated")
    expected = rows * cols * bits // 8
    actual = len(ds.PixelData)
    if actual < expected:
        raise ImageError(
            "truncated",
            f"DICOM pixel data is truncated: {actual} bytes for a {cols}x{rows} {bits}-bit image needing {expected}",
        )


def _check_codestream(ds, limits: ImageLimits) -> bytes:
    """Compressed pixel data: a decoder we have, one frame, and a codestream that declares the header's size.
    Returns the frame.

    A JPEG or JPEG 2000 codestream carries its own width and height; a file whose header says 512x512
    but whose codestream decodes to 60000x60000 is a decompression bomb, refused before decoding.
    """
    from pydicom.encaps import generate_frames
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.TransferSyntaxUID
    try:
        available = get_decoder(uid).is_available
    except Exception:
        available = False
    if not available:
        raise ImageError(
            "unsupported_transfer_syntax", f"DICOM transfer syntax {uid} ({uid.name}) cannot be decoded here"
        )
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except StopIteration:
        raise ImageError("no_pixel_data", "DICOM encapsulated pixel data holds no frame") from None
    except Exception as exc:
        raise ImageError("corrupt", f"DICOM encapsulated pixel data is malformed: {_short(exc)}") from None
    if not frame:
        raise ImageError("no_pixel_data", "DICOM encapsulated pixel data holds an empty frame")
    # JPEG and JPEG 2000 codestreams end with FFD9 (EOI / EOC), before padding (a 0x00 to even length, or 0xFF
    # fill bytes as in pydicom's JPGExtended.dcm). libjpeg decodes a cut-off codestream without complaint, so a
    # truncated frame is caught here.
    if frame[:2] in (b"\xff\xd8", b"\xff\x4f") and not frame.rstrip(b"\x00\xff").endswith(b"\xff\xd9"):
        raise ImageError("truncated", f"DICOM {uid.name} frame is truncated (no end-of-image marker)")
    size = _codestream_size(frame)
    if size is None:
        return frame
    width, height = size
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if width * height > limits.max_pixels:
        raise ImageError(
            "too_many_pixels", f"DICOM codestream is {width}x{height}; the limit is {limits.max_pixels} pixels"
        )
    if (width, height) != (cols, rows):
        raise ImageError("corrupt", f"DICOM codestream is {width}x{height} but the header says {cols}x{rows}")
    return frame


def _is_jpeg8(frame: bytes) -> bool:
    """A baseline, extended or progressive (SOF0/1/2) JPEG codestream with 8-bit samples: libjpeg-turbo's."""
    if frame[:2] != b"\xff\xd8":
        return False
    pos = 2
    while pos + 5 <= len(frame) and frame[pos] == 0xFF:
        marker = frame[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xC0, 0xC1, 0xC2):
            return frame[pos + 4] == 8
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return False  # another SOF (lossless, arithmetic...) or the scan itself
        pos += 2 + struct.unpack(">H", frame[pos + 2 : pos + 4])[0]
    return False


def _codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) declared by a JPEG (SOF) or JPEG 2000 (SIZ) codestream; None for other encodings."""
    if frame[:2] == b"\xff\xd8":  # JPEG family (baseline, extended, lossless, JPEG-LS): walk markers to the SOF
        pos = 2
        while pos + 4 <= len(frame):
            if frame[pos] != 0xFF:
                return None
            marker = frame[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            length = struct.unpack(">H", frame[pos + 2 : pos + 4])[0]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
                if pos + 9 > len(frame):
                    return None
                height, width = struct.unpack(">HH", frame[pos + 5 : pos + 9])
                return width, height
            pos += 2 + length
        return None
    if frame[:4] == b"\xff\x4f\xff\x51" and len(frame) >= 24:  # JPEG 2000 codestream: SOC, SIZ, Lsiz, Rsiz, sizes
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", frame[8:24])
        return xsiz - xosiz, ysiz - yosiz
    return None
