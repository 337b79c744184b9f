"""Images that are not chest radiographs, made here or shipped by packages (never downloaded), for the input gate's
tests and its measurement (`python -m training.gate_report`).

    photo       scikit-image's sample photographs (the dev extra), as PNG
    text        rendered text, dark on light and light on dark
    noise       uniform, Gaussian and salt-and-pepper noise
    gradient    linear and radial gradients, checkerboards, flat images
    ct_mr       CT, MR and nuclear-medicine slices from pydicom's own test files, as DICOM (the header refuses them)
                and as PNG (kind "ct_mr_pixels": the same pixels with no header, so only the pixel gate can)
And the radiographs given, transformed: rotated 90 and 180 degrees, and inverted (kinds rotated_90, rotated_180,
inverted).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PHOTOS = (
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "rocket",
    "coins",
    "moon",
    "page",
    "text",
    "horse",
    "clock",
    "hubble_deep_field",
    "immunohistochemistry",
    "brick",
    "grass",
    "gravel",
    "logo",
    "retina",
    "cell",
    "microaneurysms",
    "colorwheel",
    "binary_blobs",
    "checkerboard",
    "shepp_logan_phantom",
)
# pydicom's bundled test files (pydicom.data, no download): CT, MR and NM slices
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm", "JPEG2000.dcm")
SIDE = 256


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def photos() -> list[tuple[str, bytes]]:
    from skimage import data

    found = []
    for name in PHOTOS:
        try:
            image = getattr(data, name)()
        except Exception:  # noqa: BLE001 - a sample that needs a download (pooch) is left out, never fetched
            continue
        image = np.asarray(image)
        if image.dtype != np.uint8:
            image = image.astype(np.float64)
            image = (255 * (image - image.min()) / max(float(np.ptp(image)), 1e-9)).astype(np.uint8)
        if image.ndim == 3:
            image = image[..., :3]
        found.append((name, png(np.ascontiguousarray(image))))
    return found


def texts() -> list[tuple[str, bytes]]:
    lines = [
        "Patient information leaflet",
        "Report: no acute cardiopulmonary process.",
        "The quick brown fox jumps",
        "lorem ipsum dolor sit amet",
        "0123456789 ABCDEFGHIJ",
    ]
    found = []
    for i, line in enumerate(lines):
        for dark_on_light in (True, False):
            image = Image.new("L", (SIDE * 2, SIDE), 255 if dark_on_light else 0)
            draw = ImageDraw.Draw(image)
            font = ImageFont.load_default(size=18 + 4 * i)
            for row in range(0, SIDE, 30 + 4 * i):
                draw.text((8, row), line, fill=0 if dark_on_light else 255, font=font)
            found.append((f"text{i}_{'dark' if dark_on_light else 'light'}", png(np.asarray(image))))
    return found


def noise(seed: int = 0) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    found = []
    for i in range(4):
        found.append((f"uniform{i}", png(rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8))))
        gauss = np.clip(rng.normal(128 + 20 * (i - 1.5), 20 + 15 * i, (SIDE, SIDE)), 0, 255).astype(np.uint8)
        found.append((f"gaussian{i}", png(gauss)))
        sp = np.full((SIDE, SIDE), 128, np.uint8)
        mask = rng.random((SIDE, SIDE))
        sp[mask < 0.05 * (i + 1)] = 0
        sp[mask > 1 - 0.05 * (i + 1)] = 255
        found.append((f"salt_pepper{i}", png(sp)))
        low = rng.normal(0, 1, (8 * (i + 1), 8 * (i + 1)))  # smooth (low-frequency) noise
        smooth = np.asarray(
            Image.fromarray(((low - low.min()) / np.ptp(low) * 255).astype(np.uint8)).resize(
                (SIDE, SIDE), Image.BICUBIC
            )
        )
        found.append((f"smooth{i}", png(smooth)))
    return found


def gradients() -> list[tuple[str, bytes]]:
    y, x = np.mgrid[0:SIDE, 0:SIDE] / (SIDE - 1)
    r = np.hypot(x - 0.5, y - 0.5) / np.sqrt(0.5)
    images = {
        "linear_x": x,
        "linear_y": y,
        "linear_diag": (x + y) / 2,
        "radial": 1 - r,
        "radial_inv": r,
        "rings": (np.sin(r * 20) + 1) / 2,
        "checker8": ((x * 8).astype(int) + (y * 8).astype(int)) % 2,
        "checker32": ((x * 32).astype(int) + (y * 32).astype(int)) % 2,
        "flat_black": 0 * x,
        "flat_grey": 0 * x + 0.5,
        "flat_white": 0 * x + 1,
        "stripes": (np.sin(x * 40) + 1) / 2,
    }
    return [(name, png((np.clip(v, 0, 1) * 255).astype(np.uint8))) for name, v in images.items()]


def ct_mr() -> list[tuple[str, bytes]]:
    """pydicom's CT/MR/NM test files as they are (DICOM bytes, with their Modality)."""
    from pydicom.data import get_testdata_file

    found = []
    for name in PYDICOM_FILES:
        path = get_testdata_file(name, download=False)
        if path:
            found.append((name, open(path, "rb").read()))
    return found


def ct_mr_pixels() -> list[tuple[str, bytes]]:
    """The same slices as PNG (no header: only the pixel gate can tell), and flipped, as 8-bit by the shared reader."""
    from cxr.imaging import read_image

    found = []
    for name, data in ct_mr():
        pixels = read_image(data).pixels
        for variant, image in (("", pixels), ("_flipped", pixels[::-1]), ("_mirrored", pixels[:, ::-1])):
            found.append((name.replace(".dcm", variant), png(np.ascontiguousarray(image))))
    return found


def transformed_radiographs(images: np.ndarray) -> dict[str, list[np.ndarray]]:
    """uint8 [N,S,S] radiographs -> rotated 90 and 180 degrees, and inverted (same size)."""
    return {
        "rotated_90": [np.ascontiguousarray(np.rot90(i)) for i in images],
        "rotated_180": [np.ascontiguousarray(np.rot90(i, 2)) for i in images],
        "inverted": [255 - i for i in images],
    }


def non_radiographs() -> dict[str, list[tuple[str, bytes]]]:
    """Every kind that is not a chest radiograph: kind -> [(name, image bytes)]."""
    return {
        "photo": photos(),
        "text": texts(),
        "noise": noise(),
        "gradient": gradients(),
        "ct_mr": ct_mr(),
        "ct_mr_pixels": ct_mr_pixels(),
    }
