"""The reader's pixel formula as it was before the lookup-table path (issue 11), frozen as an oracle.

pydicom's `pixel_array`, then modality rescale, VOI LUT or window, full range to 8 bits and MONOCHROME1 inversion,
each over the whole image in float64. The reader now computes the same chain once per distinct stored value
(cxr.imaging.lookup_to_uint8); the parity tests and bench/decode.py compare it against this. No header checks here:
only call it on inputs the reader accepts.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cxr.imaging import _to_uint8


def float_dicom_pixels(data: bytes) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.PhotometricInterpretation = str(ds.PhotometricInterpretation).strip().upper()
    if ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit:
        ds.pixel_array_options(decoding_plugin="pillow")  # the reader's choice (the same pixels as its strict decode)
    arr = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        try:
            windowed = apply_voi_lut(arr, ds).astype(np.float64)
        except Exception:
            windowed = None
        if windowed is not None and np.isfinite(windowed).all():
            arr = windowed
    assert np.isfinite(arr).all(), "the reader refuses non-finite rescales: not a parity case"
    pixels = _to_uint8(arr, float(arr.min()), float(arr.max()))
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = 255 - pixels
    return pixels


def float_png16_pixels(data: bytes) -> np.ndarray:
    arr = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64)
    return _to_uint8(arr, arr.min(), arr.max())
