"""Class activation heatmaps: the model's low-resolution `cam` output, upsampled and overlaid on the radiograph."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MAX_SIDE = 512  # the overlay is for a person to look at, not a diagnostic image
ALPHA = 0.45  # weight of the colour map over the grayscale radiograph


def _jet(values: np.ndarray) -> np.ndarray:
    """The 'jet' colour map for values in [0, 1]: float [H, W] -> uint8 [H, W, 3] (blue low, red high)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.concatenate([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def normalise(cam: np.ndarray) -> np.ndarray:
    """Min-max scale a map to [0, 1]; a flat map becomes all zeros."""
    cam = np.asarray(cam, dtype=np.float32)
    low, high = float(cam.min()), float(cam.max())
    if not np.isfinite([low, high]).all() or high <= low:
        return np.zeros_like(cam)
    return (cam - low) / (high - low)


def overlay_png(pixels: np.ndarray, cam: np.ndarray) -> bytes:
    """PNG of the grayscale radiograph `pixels` (uint8 [H, W]) with `cam` (float [h, w]) overlaid in colour."""
    image = Image.fromarray(pixels)
    scale = min(1.0, MAX_SIDE / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    heat = Image.fromarray(normalise(cam)).resize(image.size, Image.BILINEAR)
    colour = _jet(np.asarray(heat)).astype(np.float32)
    gray = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = np.clip((1.0 - ALPHA) * gray + ALPHA * colour, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(blended).save(out, format="PNG", optimize=False)
    return out.getvalue()
