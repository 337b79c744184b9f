"""Fixtures for the inference tests: a served copy of the trained test repository and real radiographs at the
models' input size. Servers run as subprocesses (tests/inference/server_process.py).

Our generated `inference` protobuf package and tritonclient's copy register the same symbols and cannot share a
process, and pytest runs every test module in one process: so the tests that use tritonclient run in a child
pytest (test_tritonclient.py runs tritonclient_checks/), and nothing here imports either at module level.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

TEST_IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def served_repository(trained_repository, tmp_path_factory) -> Path:
    """A copy of the trained test repository, as an operator would serve it: custom_cnn serves both versions."""
    from cxr import repository

    repo = tmp_path_factory.mktemp("inference") / "model_repository"
    shutil.copytree(trained_repository, repo)
    config = repository.read_config(repo / "custom_cnn")
    config.version_policy.all.SetInParent()
    repository.write_config(repo / "custom_cnn", config)
    return repo


@pytest.fixture(scope="session")
def radiographs(cxr_raw_dir) -> np.ndarray:
    """Six real radiographs (two per class) as the models take them: uint8 [6, 1, 64, 64]."""
    from cxr.imaging import load_for_model

    images = []
    for folder in sorted(p for p in cxr_raw_dir.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.png"))[:2]:
            images.append(load_for_model(path, TEST_IMAGE_SIZE))
    assert len(images) == 6, f"expected 2 PNGs in each of 3 class folders of {cxr_raw_dir}"
    return np.stack(images)[:, None]
