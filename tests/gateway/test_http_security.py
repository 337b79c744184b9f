"""TLS, mutual TLS and bearer tokens on the gateway's HTTP port: the same settings, the same certificates and the
same tokens as its gRPC port (tests/gateway/test_security.py), checked with a plain HTTP client.

The inference service is absent (the gateway points at a closed port): a request that gets through TLS and the
token check is answered 503 UNAVAILABLE by the gateway itself, which proves it got in; one that does not is
refused before (a TLS failure, or 401). /healthz needs no token (probes) and says NOT_SERVING (503).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import requests

from tests.gateway import certs, processes

TOKENS = ("token-for-pacs-a", "token-for-pacs-b")


def _refused_by_tls(url: str, **kwargs) -> bool:
    try:
        requests.get(url, timeout=10, **kwargs)
    except (requests.exceptions.SSLError, requests.exceptions.ConnectionError, ssl.SSLError):
        return True
    return False


def test_tls_on_http(tmp_path: Path, pki: certs.Pki, dead_upstream: str):
    gateway = processes.start_gateway(
        dead_upstream, tmp_path, extra=["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    )
    try:
        url = f"https://127.0.0.1:{gateway.http_port}"
        models = requests.get(f"{url}/v1/models", verify=str(pki.ca), timeout=30)
        assert models.status_code == 503 and models.json()["codeName"] == "UNAVAILABLE"  # in; no inference service
        assert requests.get(f"{url}/healthz", verify=str(pki.ca), timeout=30).status_code == 503
        page = requests.get(f"{url}/", verify=str(pki.ca), timeout=30)
        assert page.status_code == 200 and "Not for clinical use" in page.text
        assert _refused_by_tls(f"{url}/healthz", verify=str(pki.rogue_ca)), "a server the client does not trust"
        plain = f"http://127.0.0.1:{gateway.http_port}/healthz"
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(plain, timeout=10)  # no plaintext on a TLS port
    finally:
        assert gateway.stop() == 0


def test_mutual_tls_and_tokens_on_http(tmp_path: Path, pki: certs.Pki, dead_upstream: str):
    gateway = processes.start_gateway(
        dead_upstream,
        tmp_path,
        extra=["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)],
        env={"CXR_GATEWAY_AUTH_TOKENS": ",".join(TOKENS)},
    )
    try:
        url = f"https://127.0.0.1:{gateway.http_port}"
        client = {"verify": str(pki.ca), "cert": (str(pki.client_cert), str(pki.client_key)), "timeout": 30}
        assert _refused_by_tls(f"{url}/healthz", verify=str(pki.ca)), "no client certificate"
        assert _refused_by_tls(
            f"{url}/healthz", verify=str(pki.ca), cert=(str(pki.rogue_client_cert), str(pki.rogue_client_key))
        ), "another CA's client"

        health = requests.get(f"{url}/healthz", **client)  # probes need no token
        assert (health.status_code, health.json()) == (503, {"status": "NOT_SERVING"})
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token"},
            {"Authorization": f"Basic {TOKENS[0]}"},
            {"Authorization": f"Bearer {TOKENS[0][:-1]}"},
        ):
            for method, path in (("get", "/v1/models"), ("post", "/v1/classify")):
                answer = getattr(requests, method)(f"{url}{path}", headers=headers, data=b"x", **client)
                assert answer.status_code == 401, (headers, path, answer.text)
                assert answer.json()["codeName"] == "UNAUTHENTICATED"
                assert answer.headers["WWW-Authenticate"] == "Bearer"
        for token in TOKENS:
            answer = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"}, **client)
            assert answer.status_code == 503, answer.text  # through TLS and the token check; no upstream
        assert all(token not in gateway.log_text() for token in TOKENS)
    finally:
        assert gateway.stop() == 0
