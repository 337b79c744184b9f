"""Shared test fixtures: where the real data lives, and the rule for when it is missing.

Data is found through environment variables that default to ../shared/data/...; without it a test
skips with a reason, except under CI=true, where it fails instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip when something a test needs is missing; fail instead under CI=true."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: missing prerequisites fail instead of skipping)")
    pytest.skip(reason)


def _data_dir(env: str, default: Path) -> Path:
    path = Path(os.environ.get(env, str(default)))
    require(path.is_dir(), f"{env}={path} not found: real data needed for this test")
    return path


@pytest.fixture(scope="session")
def cxr_raw_dir() -> Path:
    """Raw radiographs, ImageFolder layout with manifest.csv (CXR_RAW_DATA)."""
    return _data_dir("CXR_RAW_DATA", SHARED_DATA / "cxr-raw")


@pytest.fixture(scope="session")
def cxr_adult_viral_dir() -> Path:
    """Adult viral pneumonia (COVID-19) radiographs from three sites and 20 same-site normals (CXR_ADULT_VIRAL_DATA)."""
    return _data_dir("CXR_ADULT_VIRAL_DATA", SHARED_DATA / "cxr-adult-viral")


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    """Real chest DICOM files (CXR_DICOM_DATA)."""
    return _data_dir("CXR_DICOM_DATA", SHARED_DATA / "dicom")


@pytest.fixture(scope="session")
def trained_repository(cxr_raw_dir, tmp_path_factory) -> Path:
    """A real Triton-layout model repository, trained once per session on 30 real radiographs per class (64x64,
    1 epoch) and exported by training's own exporter: custom_cnn versions 1 and 2, mobilenet 1, resnet50 1,
    ensemble 1 (custom_cnn v1 + mobilenet + resnet50). See training/testing.py. About 1-2 minutes of CPU."""
    import importlib.util

    require(
        importlib.util.find_spec("torch") is not None, "torch (the [train] extra) is needed to build the test models"
    )
    from training.testing import build_test_repository

    return build_test_repository(cxr_raw_dir, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def toy_onnx(tmp_path_factory) -> Path:
    """The few-kilobyte toy classifier of tests/toy_model.py (no torch, no data): image uint8 [N,1,16,16] ->
    probabilities, logits [N,3], cam [N,3,2,2]."""
    from tests import toy_model

    return toy_model.build(tmp_path_factory.mktemp("toy") / "model.onnx")


@pytest.fixture(scope="session")
def toy_repository(toy_onnx, tmp_path_factory) -> Path:
    """A model repository holding the toy classifier as model `toy`, version 1, written by cxr.repository."""
    from cxr import repository
    from tests import toy_model

    repo = tmp_path_factory.mktemp("toy_repository")
    repository.write_model(
        repo, "toy", toy_onnx, classes=toy_model.CLASSES, image_size=toy_model.SIZE, model_card={"architecture": "toy"}
    )
    return repo
