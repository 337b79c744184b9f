"""TLS / mutual TLS credentials and bearer-token authentication, for every cxr gRPC server and client.

- `server_credentials(cert, key, client_ca)`: TLS on a server port; with `client_ca` the server requires and
  verifies a client certificate (mutual TLS).
- `channel_credentials(ca, cert, key)`: the client side; `cert` + `key` present a client certificate.
- `TokenAuthInterceptor`: every call (or the methods named) must carry `authorization: Bearer <token>` metadata
  with one of the configured tokens, else UNAUTHENTICATED, logged (method, peer; never the token) and counted.
  The health service is exempt, so load balancers and `grpc_health_probe` work without a token.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

log = logging.getLogger("cxr.security")

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(
    cert_file: str | Path, key_file: str | Path, client_ca_file: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS for a server port; mutual TLS (client certificate required and verified) when `client_ca_file` is set."""
    return grpc.ssl_server_credentials(
        [(_read(key_file), _read(cert_file))],
        root_certificates=_read(client_ca_file),
        require_client_auth=client_ca_file is not None,
    )


def channel_credentials(
    ca_file: str | Path | None = None, cert_file: str | Path | None = None, key_file: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS for a client channel: `ca_file` verifies the server (system roots when None); cert+key for mutual TLS."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both the certificate and its key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file), private_key=_read(key_file), certificate_chain=_read(cert_file)
    )


def load_tokens(token_file: str | Path | None = None, tokens: str | Iterable[str] = "") -> frozenset[str]:
    """Accepted tokens: one per line in `token_file` (blank lines and # comments ignored) plus `tokens`
    (a comma-separated string, as it comes from an environment variable, or a list)."""
    found: set[str] = set()
    if token_file:
        for line in Path(token_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.add(line)
    if isinstance(tokens, str):
        tokens = tokens.split(",")
    found.update(t.strip() for t in tokens if t.strip())
    return frozenset(found)


def bearer_metadata(token: str | None = None, env: str = "CXR_TOKEN") -> list[tuple[str, str]]:
    """Client call metadata carrying a bearer token (from `token` or the environment variable `env`)."""
    token = token or os.environ.get(env, "")
    return [("authorization", f"Bearer {token}")] if token else []


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid bearer token with UNAUTHENTICATED; health checks are exempt.

    `only`: the full method names that need a token (None: every method that is not exempt). Each refusal is
    logged with the method and the peer address (never the token) and reported to `on_refused(method)`."""

    def __init__(
        self,
        tokens: Iterable[str],
        exempt_prefixes: tuple[str, ...] = (HEALTH_PREFIX,),
        *,
        only: Iterable[str] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ):
        self._tokens = [t.encode() for t in tokens]
        if not self._tokens:
            raise ValueError("token authentication needs at least one token")
        self._exempt = exempt_prefixes
        self._only = frozenset(only) if only is not None else None
        self._on_refused = on_refused

    def _check(self, metadata) -> str | None:
        """None when authorized, else why not ("missing" or "invalid")."""
        for key, value in metadata or ():
            if key.lower() != "authorization":
                continue
            scheme, _, token = (value if isinstance(value, str) else value.decode()).partition(" ")
            if scheme.lower() != "bearer":
                return "invalid"
            given = token.strip().encode()
            # compare against every token in constant time, so timing does not reveal a prefix
            return None if any([hmac.compare_digest(given, t) for t in self._tokens]) else "invalid"
        return "missing"

    def _needs_token(self, method: str) -> bool:
        return not method.startswith(self._exempt) and (self._only is None or method in self._only)

    def _report(self, method: str, peer: str, problem: str) -> None:
        log.warning("authentication refused", extra={"fields": {"method": method, "peer": peer, "token": problem}})
        if self._on_refused is not None:
            self._on_refused(method)

    def authorize(self, method: str, authorization: str | None, peer: str) -> str | None:
        """The same check for another transport (HTTP): `method` is the gRPC method the request maps to and
        `authorization` the request's Authorization header. None when allowed, else why not ("missing" or
        "invalid"); a refusal is logged and counted as on gRPC."""
        if not self._needs_token(method):
            return None
        problem = self._check([("authorization", authorization)] if authorization is not None else [])
        if problem is not None:
            self._report(method, peer, problem)
        return problem

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if not self._needs_token(method):
            return await continuation(handler_call_details)
        problem = self._check(handler_call_details.invocation_metadata)
        if problem is None:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return self._refusing(handler, method, problem) if handler is not None else None

    def _refusing(self, handler: grpc.RpcMethodHandler, method: str, problem: str) -> grpc.RpcMethodHandler:
        """A handler of the same shape as `handler` that answers UNAUTHENTICATED without reading the request."""

        async def refuse(request_or_iterator, context):
            self._report(method, context.peer(), problem)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"{problem} bearer token (metadata 'authorization: Bearer <token>')"
            )

        kwargs = dict(
            request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
