"""Data discovery, the split, and the one-reader rule (training's eval preprocessing == what serving sends)."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from cxr.imaging import load_for_model
from training import data as D


def _some_files(cxr_raw_dir: Path, cls: str, n: int) -> list[Path]:
    return sorted((cxr_raw_dir / cls).glob("*.png"))[:n]


def test_imagefolder_and_radiography_db_layouts(cxr_raw_dir, tmp_path):
    flat, radiography = tmp_path / "flat", tmp_path / "radiography"
    for cls in ("Normal", "Viral Pneumonia"):
        for f in _some_files(cxr_raw_dir, cls, 3):
            (flat / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, flat / cls / f.name)
            for sub in ("images", "masks"):  # Kaggle's layout: masks/ must be ignored
                (radiography / cls / sub).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, radiography / cls / sub / f.name)
    for root in (flat, radiography):
        found = D.discover(root, ["Viral Pneumonia", "Normal"])  # --classes chooses and orders
        assert len(found.samples) == 6
        assert {s.label for s in found.samples if "Viral" in s.file} == {0}
        assert all("masks" not in s.file for s in found.samples)
        assert all(s.patient.startswith("file:") and s.source_origin == "unknown" for s in found.samples)
    with pytest.raises(FileNotFoundError, match="Lung_Opacity"):
        D.discover(flat, ["Normal", "Lung_Opacity"])


def test_manifest_gives_patient_and_source(cxr_raw_dir):
    found = D.discover(cxr_raw_dir, list(D.DEFAULT_CLASSES))
    assert found.manifest == cxr_raw_dir / "manifest.csv"  # DATA/manifest.csv is used when present
    assert len(found.samples) == 872
    assert {s.source_origin for s in found.samples} == {"nih", "kermany"}
    assert all(s.patient.startswith(("nih:", "kermany:")) for s in found.samples)


def test_unreadable_files_are_reported_and_skipped(cxr_raw_dir, tmp_path):
    good = _some_files(cxr_raw_dir, "Normal", 2)
    (tmp_path / "Normal").mkdir()
    (tmp_path / "Lung_Opacity").mkdir()
    for f in good:
        shutil.copy(f, tmp_path / "Normal" / f.name)
    shutil.copy(_some_files(cxr_raw_dir, "Lung_Opacity", 1)[0], tmp_path / "Lung_Opacity" / "ok.png")
    (tmp_path / "Normal" / "truncated.png").write_bytes(good[0].read_bytes()[:200])
    (tmp_path / "Lung_Opacity" / "empty.jpg").write_bytes(b"")
    (tmp_path / "Lung_Opacity" / "text.png").write_bytes(b"not an image at all")
    found = D.discover(tmp_path, ["Normal", "Lung_Opacity"])
    images, skipped = D.load_images(tmp_path, found.samples, 64)
    assert sorted(s.file for s in skipped) == [
        "Lung_Opacity/empty.jpg",
        "Lung_Opacity/text.png",
        "Normal/truncated.png",
    ]
    assert all(s.reason for s in skipped)
    assert images.images.shape == (3, 64, 64) and images.labels.tolist() == [0, 0, 1]


def test_split_is_stratified_seeded_and_patient_disjoint_on_real_data(cxr_raw_dir):
    found = D.discover(cxr_raw_dir, list(D.DEFAULT_CLASSES))
    split = D.stratified_patient_split(found.samples, 0.2, seed=0)
    assert split == D.stratified_patient_split(found.samples, 0.2, seed=0)
    assert split != D.stratified_patient_split(found.samples, 0.2, seed=1)
    sides = defaultdict(set)
    for s, side in zip(found.samples, split):
        sides[s.patient].add(side)
    assert all(len(v) == 1 for v in sides.values())
    for label in range(3):
        n = sum(s.label == label for s in found.samples)
        n_val = sum(s.label == label and side == "val" for s, side in zip(found.samples, split))
        assert abs(n_val - 0.2 * n) <= 1


def test_split_keeps_patients_with_many_images_on_one_side():
    rng = np.random.default_rng(3)
    samples = []
    for p in range(120):  # 1-6 images per patient, classes mostly per patient, some patients mixed
        label = p % 3
        for k in range(int(rng.integers(1, 7))):
            samples.append(D.Sample(f"{p}_{k}.png", label if k < 4 else (label + 1) % 3, f"patient{p}", "x"))
    split = D.stratified_patient_split(samples, 0.2, seed=0)
    sides = defaultdict(set)
    for s, side in zip(samples, split):
        sides[s.patient].add(side)
    assert all(len(v) == 1 for v in sides.values())
    for label in range(3):
        n = sum(s.label == label for s in samples)
        n_val = sum(s.label == label and side == "val" for s, side in zip(samples, split))
        assert 0.12 * n <= n_val <= 0.28 * n  # whole patients move: near, not exactly, 20%


def test_split_manifest_round_trip(tmp_path):
    samples = [D.Sample("Normal/a.png", 0, "p1", "nih"), D.Sample("Viral Pneumonia/b.png", 2, "p2", "kermany")]
    classes = list(D.DEFAULT_CLASSES)
    D.write_split(tmp_path / "split.csv", samples, ["train", "val"], classes)
    back, split = D.read_split(tmp_path / "split.csv", classes)
    assert back == samples and split == ["train", "val"]


@pytest.mark.parametrize("size", [64, 224])
def test_training_eval_preprocessing_is_the_serving_reader(cxr_raw_dir, dicom_dir, tmp_path, size):
    """The design's rule: what a model saw in training is exactly what the gateway sends (cxr.imaging.load_for_model)."""
    files = _some_files(cxr_raw_dir, "Lung_Opacity", 2) + _some_files(
        cxr_raw_dir, "Viral Pneumonia", 2
    )  # 256 and 224 px
    (tmp_path / "Normal").mkdir()
    for f in files:
        shutil.copy(f, tmp_path / "Normal" / f.name)
    dicoms = [f for f in sorted(dicom_dir.glob("*.dcm")) if f.name.startswith(("nih_", "CR-"))]
    for f in dicoms:
        shutil.copy(f, tmp_path / "Normal" / f.name)
    found = D.discover(tmp_path, ["Normal"])
    images, skipped = D.load_images(tmp_path, found.samples, size)
    assert not skipped and len(images.samples) == len(files) + len(dicoms)
    for image, sample in zip(images.images, images.samples):
        served = load_for_model((tmp_path / sample.file).read_bytes(), size)
        assert image.dtype == np.uint8 and np.array_equal(image, served), sample.file
