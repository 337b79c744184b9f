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
def dicom_dir() -> Path:
    """Real chest DICOM files (CXR_DICOM_DATA)."""
    return _data_dir("CXR_DICOM_DATA", SHARED_DATA / "dicom")
