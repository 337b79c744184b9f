"""Who may talk to the inference service: TLS or mutual TLS on its port, and bearer tokens on its RPCs.

With tokens configured (CXR_INFERENCE_AUTH_TOKENS or --auth-token-file), every RPC needs one (`auth_scope`
all), or only the repository-control RPCs that change what is served (`control`: RepositoryModelLoad/Unload).
Health is always exempt: grpc.health.v1 and KServe's ServerLive/ServerReady, so probes and the gateways'
readiness checks need no secret. Refusals are logged (method, peer; never the token) and counted in
`cxr_inference_auth_refused_total{method}`.
"""

from __future__ import annotations

import grpc

from cxr.generated.inference import grpc_service_pb2 as pb
from services.common.security import HEALTH_PREFIX, TokenAuthInterceptor, load_tokens, server_credentials
from services.inference.config import InferenceSettings
from services.inference.metrics import InferenceMetrics

_SERVICE = "/" + pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name + "/"
HEALTH_METHODS = (HEALTH_PREFIX, _SERVICE + "ServerLive", _SERVICE + "ServerReady")
CONTROL_METHODS = (_SERVICE + "RepositoryModelLoad", _SERVICE + "RepositoryModelUnload")


def auth_interceptor(settings: InferenceSettings, metrics: InferenceMetrics) -> TokenAuthInterceptor | None:
    """The one token check of both ports (the gRPC interceptor; REST calls its `authorize`); None without tokens."""
    tokens = load_tokens(settings.auth_token_file, settings.auth_tokens)
    if not tokens:
        return None
    only = CONTROL_METHODS if settings.auth_scope == "control" else None
    return TokenAuthInterceptor(
        tokens, HEALTH_METHODS, only=only, on_refused=lambda method: metrics.auth_refused.labels(method).inc()
    )


def add_port(server: grpc.aio.Server, settings: InferenceSettings) -> int:
    """Bind the gRPC port: TLS when a certificate and key are configured (mutual TLS with a client CA)."""
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert and settings.tls_key:
        return server.add_secure_port(
            address, server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        )
    if settings.tls_cert or settings.tls_key or settings.tls_client_ca:
        raise SystemExit("TLS needs both --tls-cert and --tls-key (CXR_INFERENCE_TLS_CERT / _TLS_KEY)")
    return server.add_insecure_port(address)


def describe_security(settings: InferenceSettings, tokens: bool) -> str:
    tls = "mutual TLS" if settings.tls_cert and settings.tls_client_ca else "TLS" if settings.tls_cert else "plaintext"
    return f"{tls}, " + (f"bearer tokens on {settings.auth_scope} RPCs" if tokens else "no token authentication")
