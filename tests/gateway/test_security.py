"""TLS, mutual TLS and bearer tokens on the real gateway process, with certificates made by the tests.

The inference service is absent here (the gateway points at a closed port): a call that gets through the
transport and the token check is answered UNAVAILABLE by the gateway itself, which proves it got in;
a call that does not is refused before reaching the gateway's code. Health checks answer NOT_SERVING.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.generated.cxr.v1 import gateway_pb2_grpc
from services.common.security import channel_credentials, load_tokens
from tests.gateway import certs, processes

TOKENS = ("token-for-pacs-a", "token-for-pacs-b")


def _gateway(tmp_path: Path, upstream: str, extra: list[str], env: dict[str, str] | None = None) -> processes.Service:
    return processes.start_gateway(upstream, tmp_path, extra=extra, env=env)


def _list_models(address: str, credentials=None, metadata=None) -> grpc.StatusCode:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    try:
        gateway_pb2_grpc.GatewayStub(channel).ListModels(pb.ListModelsRequest(), timeout=5, metadata=metadata)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()


def _health(address: str, credentials=None, metadata=None):
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    try:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=metadata)
            .status
        )
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()


def test_tls(tmp_path: Path, pki: certs.Pki, dead_upstream: str):
    gateway = _gateway(tmp_path, dead_upstream, ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)])
    try:
        trusted = channel_credentials(pki.ca)
        assert _health(gateway.address, trusted) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _list_models(gateway.address, trusted) == grpc.StatusCode.UNAVAILABLE  # in, but no inference service
        assert _list_models(gateway.address) == grpc.StatusCode.UNAVAILABLE  # plaintext client: no connection
        assert _health(gateway.address) == grpc.StatusCode.UNAVAILABLE
        assert (
            _health(gateway.address, channel_credentials(pki.rogue_ca)) == grpc.StatusCode.UNAVAILABLE
        )  # server not trusted
        assert '"tls":true' in gateway.log_text() and '"mtls":false' in gateway.log_text()
    finally:
        gateway.stop()


def test_mutual_tls(tmp_path: Path, pki: certs.Pki, dead_upstream: str):
    gateway = _gateway(
        tmp_path,
        dead_upstream,
        ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)],
    )
    try:
        with_cert = channel_credentials(pki.ca, pki.client_cert, pki.client_key)
        assert _health(gateway.address, with_cert) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _list_models(gateway.address, with_cert) == grpc.StatusCode.UNAVAILABLE
        assert (
            _health(gateway.address, channel_credentials(pki.ca)) == grpc.StatusCode.UNAVAILABLE
        )  # no client certificate
        rogue = channel_credentials(pki.ca, pki.rogue_client_cert, pki.rogue_client_key)
        assert _health(gateway.address, rogue) == grpc.StatusCode.UNAVAILABLE  # certificate from another CA
        assert _list_models(gateway.address, rogue) == grpc.StatusCode.UNAVAILABLE
        assert '"mtls":true' in gateway.log_text()
    finally:
        gateway.stop()


@pytest.mark.parametrize("source", ["file", "env"])
def test_bearer_tokens(tmp_path: Path, dead_upstream: str, source: str):
    if source == "file":
        token_file = tmp_path / "tokens"
        token_file.write_text("# one token per line\n" + "\n".join(TOKENS) + "\n\n")
        gateway = _gateway(tmp_path, dead_upstream, ["--auth-token-file", str(token_file)])
    else:
        gateway = _gateway(tmp_path, dead_upstream, [], env={"CXR_GATEWAY_AUTH_TOKENS": ",".join(TOKENS)})
    try:
        address = gateway.address
        assert _list_models(address) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            _list_models(address, metadata=[("authorization", "Bearer wrong-token")]) == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            _list_models(address, metadata=[("authorization", f"Basic {TOKENS[0]}")]) == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            _list_models(address, metadata=[("authorization", f"Bearer {TOKENS[0][:-1]}")])
            == grpc.StatusCode.UNAUTHENTICATED
        )
        for token in TOKENS:
            assert _list_models(address, metadata=[("authorization", f"Bearer {token}")]) == grpc.StatusCode.UNAVAILABLE
        # health is exempt: probes need no token
        assert _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        # streaming calls are checked too
        channel = grpc.insecure_channel(address)
        with pytest.raises(grpc.RpcError) as info:
            list(
                gateway_pb2_grpc.GatewayStub(channel).ClassifyStream(iter([pb.ClassifyRequest(image=b"x")]), timeout=5)
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        channel.close()
        assert '"token_auth":true' in gateway.log_text()
        assert all(token not in gateway.log_text() for token in TOKENS)
    finally:
        gateway.stop()


def test_load_tokens(tmp_path: Path):
    path = tmp_path / "tokens"
    path.write_text("a1\n# comment\n\n  b2  \n")
    assert load_tokens(path, "c3, ,d4") == frozenset({"a1", "b2", "c3", "d4"})
    assert load_tokens(None, "") == frozenset()


def test_client_certificate_needs_its_key(pki: certs.Pki):
    with pytest.raises(ValueError):
        channel_credentials(pki.ca, pki.client_cert, None)
