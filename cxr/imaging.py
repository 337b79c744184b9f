"""The one image reader, shared by training and the gateway (no torch here).

What a model saw in training is exactly what it sees in production: both paths call
`read_image` (decode to an 8-bit grayscale array) and then `resize_for_model`.

DICOM follows the MONAI Deploy / torchxrayvision order: modality rescale (slope/intercept),
then VOI LUT or window, then MONOCHROME1 inversion.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_IMAGE_SIZE = 224


class ImageError(ValueError):
    """An input we refuse to read. `reason` is a short machine-readable code (safe as a metric label)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable with both arguments (decoding may run in a worker process)
        return (type(self), (self.reason, str(self)))


@dataclass(frozen=True)
class ImageLimits:
    """Limits that protect the reader from oversized inputs and decompression bombs."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 50_000_000
    min_side: int = 32  # smaller than this per side is no radiograph a model can read (a 1x1 image is refused)


# PIL's own decompression-bomb guard, aligned with ours (it raises beyond twice this; we refuse beyond
# `ImageLimits.max_pixels` from the header before decoding anything).
Image.MAX_IMAGE_PIXELS = ImageLimits.max_pixels


@dataclass
class DecodedImage:
    """A decoded radiograph: 8-bit grayscale pixels, how it was read, and what a person should know."""

    pixels: np.ndarray  # uint8 [H, W]
    format: str  # "dicom", "png" or "jpeg"
    notices: list[str] = field(default_factory=list)
    # DICOM header facts the gateway's input gate judges (cxr.dicom.HEADER_FACTS: Modality, BodyPartExamined,
    # ViewPosition, PatientAge), stripped strings, only those present; empty for PNG/JPEG
    header: dict[str, str] = field(default_factory=dict)


def detect_format(data: bytes) -> str:
    """ "png", "jpeg" or "dicom" from the first bytes (DICOM with or without the 128-byte preamble)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    # DICOM without a preamble (ACR-NEMA style): starts with a group 0x0008 or 0x0002 tag, little endian
    if len(data) >= 8 and data[0:2] in (b"\x08\x00", b"\x02\x00"):
        return "dicom"
    raise ImageError("unknown_format", "unrecognised image format: expected DICOM, PNG or JPEG")


def read_image(data: bytes, fmt: str | None = None, limits: ImageLimits = ImageLimits()) -> DecodedImage:
    """Decode DICOM, PNG or JPEG bytes to an 8-bit grayscale image; `fmt` None or "" detects it."""
    if not data:
        raise ImageError("empty", "empty input: no image bytes were sent")
    if len(data) > limits.max_bytes:
        raise ImageError("too_large", f"input is {len(data)} bytes; the limit is {limits.max_bytes}")
    fmt = (fmt or "").lower() or detect_format(data)
    if fmt in ("jpg", "dcm"):
        fmt = {"jpg": "jpeg", "dcm": "dicom"}[fmt]
    if fmt == "dicom":
        from cxr.dicom import read_dicom  # pydicom is imported only when a DICOM arrives

        return read_dicom(data, limits)
    if fmt in ("png", "jpeg"):
        return _read_raster(data, fmt, limits)
    raise ImageError("unknown_format", f"unsupported format {fmt!r}: expected dicom, png or jpeg")


def read_image_file(path: str | Path, limits: ImageLimits = ImageLimits()) -> DecodedImage:
    """`read_image` of a file's bytes."""
    return read_image(Path(path).read_bytes(), limits=limits)


def _read_raster(data: bytes, fmt: str, limits: ImageLimits) -> DecodedImage:
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt.upper()])
        # the header gives the size: refuse bombs before decompressing anything
        if img.width * img.height > limits.max_pixels:
            raise ImageError(
                "too_many_pixels", f"image is {img.width}x{img.height}; the limit is {limits.max_pixels} pixels"
            )
        if img.width < 1 or img.height < 1:
            raise ImageError("corrupt", f"image size {img.width}x{img.height} is invalid")
        check_min_size(img.width, img.height, limits)
        # libjpeg decodes damaged entropy-coded data into plausible garbage, with only a warning: refuse it
        strict = strict_jpeg(data, img.mode) if fmt == "jpeg" else None
        if strict is not None:
            return DecodedImage(pixels=strict, format=fmt, notices=[])
        img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", f"image refused as a decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(
            "corrupt", f"the bytes are not a readable {fmt.upper()} image (wrong header or format)"
        ) from None
    except Exception as exc:  # PIL raises many types for truncated or corrupt files
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        reason = "truncated" if "truncat" in text.lower() else "corrupt"
        raise ImageError(reason, f"cannot decode {fmt.upper()}: {text}") from None
    notices: list[str] = []
    if img.mode in ("I;16", "I;16B", "I;16L"):
        pixels = lookup_to_uint8(np.asarray(img), _full_range_to_uint8)
        notices.append("16-bit image scaled to 8 bits")
    elif img.mode in ("I", "F"):  # 32-bit integer or float: too many possible values for a lookup table
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageError("corrupt", f"{fmt.upper()} holds non-finite pixel values")
        pixels = _full_range_to_uint8(arr)
        notices.append("16-bit image scaled to 8 bits")
    else:
        if img.mode not in ("L", "LA"):
            notices.append(f"{img.mode} image converted to grayscale")
        pixels = np.asarray(img.convert("L"), dtype=np.uint8)
    return DecodedImage(pixels=np.ascontiguousarray(pixels), format=fmt, notices=notices)


def check_min_size(width: int, height: int, limits: ImageLimits) -> None:
    if min(width, height) < limits.min_side:
        raise ImageError(
            "too_small", f"image is {width}x{height}; at least {limits.min_side} pixels per side are needed"
        )


def strict_jpeg(data: bytes, mode: str = "L") -> np.ndarray | None:
    """Decode a JPEG with libjpeg-turbo, refusing what libjpeg only warns about ("Corrupt JPEG data: ...",
    "Premature end of JPEG file"): Pillow and pydicom's decoders return those as pixels without a word.

    Returns uint8 [H, W] for a grayscale (mode "L") JPEG, the same pixels Pillow decodes; None for colour ones,
    which are only checked here (Pillow converts them to grayscale as before). Padding after EOI is fine."""
    import simplejpeg

    colorspace = "CMYK" if mode == "CMYK" else "GRAY"
    try:
        decoded = simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True)
    except (ValueError, RuntimeError) as exc:
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        reason = "truncated" if "premature end of jpeg file" in text.lower() else "corrupt"
        raise ImageError(reason, f"corrupt JPEG data refused: {text}") from None
    if mode != "L":
        return None
    return np.ascontiguousarray(decoded[..., 0])


def lookup_to_uint8(pixels: np.ndarray, mapping: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`mapping(pixels)` for an elementwise `mapping` of an integer image of 8 or 16 bits to uint8, computed once
    per distinct value present and applied as a lookup table.

    Bit-identical to mapping the whole image (the same function on the same values), at a fraction of the cost: a
    1024x1024 radiograph holds at most 65536 distinct values, usually a few thousand. `mapping` sees exactly the
    values that occur, so a min/max or finiteness check inside it judges the image as a whole-image pass would."""
    if pixels.dtype.kind not in "iu" or pixels.dtype.itemsize > 2:
        raise TypeError(f"a lookup table needs 8- or 16-bit integer pixels, not {pixels.dtype}")
    # signed values index the table by their bit pattern (the same byte order: a view, no copy)
    words = pixels.view(pixels.dtype.str.replace("i", "u"))
    # bytes: Pillow counts them ~3x and looks them up ~1.5x faster than np.bincount and np.take
    image = Image.fromarray(np.ascontiguousarray(words)) if words.dtype == np.uint8 else None
    counts = image.histogram() if image is not None else np.bincount(words.reshape(-1), minlength=1 << 16)
    present = np.flatnonzero(counts).astype(words.dtype)
    table = np.zeros(len(counts), dtype=np.uint8)
    table[present] = mapping(present.view(pixels.dtype))
    if image is not None:
        return np.array(image.point(table.tolist()))
    return np.take(table, words)


def _full_range_to_uint8(arr: np.ndarray) -> np.ndarray:
    return _to_uint8(arr, float(arr.min()), float(arr.max()))


def _to_uint8(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linearly map [low, high] to [0, 255], clipping outside."""
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (arr.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def resize_for_model(pixels: np.ndarray, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """The one resize to the model's square input: uint8 [H, W] -> uint8 [size, size] (antialiased bilinear).

    An image 4x or more the model's side is first box-reduced by an integer factor (Pillow's reducing_gap=2, as
    its thumbnail() does): for 1024x1024 -> 224 half the time, within a few grey levels of the full filter (issue 11:
    max 2-6, mean 0.2-0.26 on the real 1024 px radiographs); smaller images (all our training data) are untouched."""
    if pixels.shape == (size, size):
        return pixels
    resized = Image.fromarray(pixels).resize((size, size), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(resized, dtype=np.uint8)


def load_for_model(source: str | Path | bytes, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """Read a file (or bytes) and resize: exactly what the gateway sends for the same image."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return resize_for_model(read_image(data).pixels, size)
