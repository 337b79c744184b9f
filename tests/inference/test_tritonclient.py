"""Run the tritonclient checks (tritonclient_checks/check_*.py) in a child pytest, one module per test.

The stock tritonclient registers the protobuf symbols of package `inference`, as does our generated code, so the
two cannot be imported in one process; pytest runs all our tests in one. The child gets the served repository
copy and the real radiographs from this process, and starts its own real servers.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, require

CHECKS_DIR = Path(__file__).parent / "tritonclient_checks"
CHECKS = sorted(p.name for p in CHECKS_DIR.glob("check_*.py"))


@pytest.mark.parametrize("module", CHECKS)
def test_tritonclient_drives_our_server(module, served_repository, radiographs, tmp_path):
    require(importlib.util.find_spec("tritonclient") is not None, "tritonclient[grpc] is not installed")
    np.save(tmp_path / "radiographs.npy", radiographs)
    env = {
        **os.environ,
        "CXR_TEST_SERVED_REPOSITORY": str(served_repository),
        "CXR_TEST_RADIOGRAPHS": str(tmp_path / "radiographs.npy"),
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        "--confcutdir",
        str(CHECKS_DIR),
        "-o",
        "python_files=check_*.py",
        "--rootdir",
        str(ROOT),
        "--basetemp",
        str(tmp_path / "child"),
        str(CHECKS_DIR / module),
    ]
    child = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(child.stdout[-20000:])
    assert child.returncode == 0, (
        f"tritonclient checks in {module} failed:\n{child.stdout[-20000:]}\n{child.stderr[-5000:]}"
    )
