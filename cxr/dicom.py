"""DICOM to 8-bit grayscale: rescale, then VOI LUT or window, then MONOCHROME1 inversion."""

from __future__ import annotations

import io

import numpy as np

from cxr.imaging import DecodedImage, ImageError, ImageLimits, _to_uint8


def read_dicom(data: bytes, limits: ImageLimits) -> DecodedImage:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise ImageError("corrupt", f"cannot parse DICOM: {exc}") from None
    if "PixelData" not in ds:
        raise ImageError("no_pixel_data", "DICOM has no pixel data (PixelData element missing)")
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        # ACR-NEMA style files without meta: the data is implicit VR little endian
        ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError("not_grayscale", f"DICOM PhotometricInterpretation {photometric} is not supported: expected MONOCHROME1 or MONOCHROME2")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError("multi_frame", f"multi-frame DICOM ({frames} frames) is not supported: send one frame per request")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > limits.max_pixels:
        raise ImageError("too_many_pixels", f"image is {cols}x{rows}; the limit is {limits.max_pixels} pixels")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise ImageError("corrupt", f"cannot decode DICOM pixel data: {exc}") from None
    if arr.ndim != 2:
        raise ImageError("not_grayscale", f"DICOM pixel array has shape {arr.shape}: expected one grayscale frame")
    notices: list[str] = []
    arr = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        arr = apply_voi_lut(arr, ds).astype(np.float64)
        notices.append("DICOM VOI LUT/window applied")
    pixels = _to_uint8(arr, float(arr.min()), float(arr.max()))
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels
        notices.append("MONOCHROME1 inverted")
    return DecodedImage(pixels=np.ascontiguousarray(pixels), format="dicom", notices=notices)
