"""Fixtures the gateway's security tests share (gRPC and HTTP ports alike)."""

from __future__ import annotations

import pytest

from tests.gateway import certs, processes


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> certs.Pki:
    return certs.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def dead_upstream() -> str:
    return f"127.0.0.1:{processes.free_port()}"
