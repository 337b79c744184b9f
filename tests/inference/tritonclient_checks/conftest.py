"""Fixtures of the tritonclient checks. They run in a child pytest started by tests/inference/test_tritonclient.py
(tritonclient and our generated protobuf code cannot share a process), which passes what the parent built in
environment variables: the served repository copy and the real radiographs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from inference.server_process import ServerProcess, start_server


def _env_path(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run these checks through tests/inference/test_tritonclient.py")
    return Path(value)


@pytest.fixture(scope="session")
def served_repository() -> Path:
    """The parent's served copy of the trained repository: read-only here (copy it before changing anything)."""
    return _env_path("CXR_TEST_SERVED_REPOSITORY")


@pytest.fixture(scope="session")
def radiographs() -> np.ndarray:
    """Six real radiographs, uint8 [6, 1, 64, 64], two per class."""
    return np.load(_env_path("CXR_TEST_RADIOGRAPHS"))


@pytest.fixture
def own_repository(served_repository, tmp_path) -> Path:
    """A private copy of the served repository, for checks that add, break or remove models."""
    repo = tmp_path / "model_repository"
    shutil.copytree(served_repository, repo)
    return repo


@pytest.fixture(scope="module")
def server(served_repository, tmp_path_factory) -> ServerProcess:
    """One server per module, in explicit model control with every model loaded at start."""
    handle = start_server(
        served_repository, tmp_path_factory.mktemp("server"), "--model-control", "explicit", "--load-model", "*"
    )
    yield handle
    handle.stop()
