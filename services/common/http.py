"""An HTTP server for an ASGI app (FastAPI) inside the service's own asyncio loop, beside its grpc.aio server.

uvicorn serves the app on a socket we bind ourselves (port 0 picks a free one, and the bound port is known before
anything is served), with optional TLS / mutual TLS from the same PEM files the gRPC port uses. Signals stay with
the service (`serving.serve_until_terminated`): uvicorn's own handlers are never installed, so one SIGTERM runs one
shutdown, and the HTTP server is stopped after the service has drained (in-flight HTTP requests finish first).

Also here: reading a request body with a byte limit, which every HTTP adapter needs before it parses anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
from pathlib import Path

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    """The request body is beyond the configured limit (the adapter answers it in its transport's terms)."""

    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than the limit of {limit} bytes")
        self.limit = limit


async def read_body(request, limit: int) -> bytes:
    """The whole body of a Starlette `request`, refused with BodyTooLarge as soon as it passes `limit` bytes
    (the Content-Length is checked first, so a large upload is refused before it is read)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class HttpServer:
    """uvicorn serving `app` on HOST:PORT in the running loop. `await start()` returns the bound port."""

    def __init__(
        self,
        app,
        host: str,
        port: int,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
        grace_period_s: float = 5.0,
    ):
        import uvicorn

        self.host, self.port = host, port
        self.tls = bool(tls_cert and tls_key)
        options = {}
        if self.tls:
            options = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)}
            if tls_client_ca:  # mutual TLS: a client certificate is required and must chain to this CA
                options.update(ssl_ca_certs=str(tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        # lifespan off: the service starts and stops its own parts; access log off: the service logs one
        # PHI-free line per request itself (a URL's query could carry anything a client put there).
        self.config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=max(1, int(grace_period_s)),
            **options,
        )
        self.server = uvicorn.Server(self.config)
        self._socket: socket.socket | None = None
        self._main: asyncio.Task | None = None

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it
        # Nagle holds a response's body until the client's delayed ACK of its headers (~40 ms per request)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._socket = sock
        if not self.config.loaded:
            self.config.load()
        self.server.lifespan = self.config.lifespan_class(self.config)  # "off": a no-op, as uvicorn's serve() sets it
        await self.server.startup(sockets=[sock])
        # main_loop refreshes the Date header once a second and returns when should_exit is set
        self._main = asyncio.get_running_loop().create_task(self.server.main_loop())
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop taking connections, let the requests in progress finish (up to the grace period), close."""
        if self._main is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._main
        await self.server.shutdown(sockets=[self._socket] if self._socket else None)
        self._main = None


async def start_http(app, settings, *, env: str, grace_period_s: float) -> HttpServer | None:
    """Serve `app` on settings.host:settings.http_port (-1: off, returns None) with the settings' TLS files (the
    gRPC port's: one security setting for both transports); a port that cannot be bound is a SystemExit naming the
    flag and the variable `env` to change."""
    if settings.http_port < 0:
        return None
    server = HttpServer(
        app,
        settings.host,
        settings.http_port,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        tls_client_ca=settings.tls_client_ca,
        grace_period_s=grace_period_s,
    )
    try:
        await server.start()
    except OSError as e:
        raise SystemExit(
            f"cannot serve HTTP on {settings.host}:{settings.http_port}: {e} (--http-port / {env}; -1 turns it off)"
        ) from None
    return server


class HttpCall:
    """The part of a gRPC servicer context a servicer method uses, for a call that came over HTTP: no client
    deadline (`time_remaining()` is None: the service's own defaults apply), no metadata, and `abort` raises the
    ServiceError (methods are called `unwrapped`, so their own ServiceErrors reach the adapter whole anyway)."""

    def time_remaining(self):
        return None

    def invocation_metadata(self):
        return ()

    async def abort(self, code, message):
        from services.common.errors import ServiceError

        raise ServiceError(code, message)


def unwrapped(method):
    """A servicer method without its `@aborts_on_error` wrapper (which is gRPC's: it turns a ServiceError into
    `context.abort(code, message)`), so an HTTP adapter gets the ServiceError whole, reason included."""
    inner = getattr(method, "__wrapped__", None)
    return functools.partial(inner, method.__self__) if inner is not None else method


def internal_error_handler(logger):
    """An exception handler for what is not a ServiceError: a bug of ours, logged with its trace by type, answered
    500 without quoting the request (the same rule as `aborts_on_error` on gRPC)."""
    from starlette.responses import JSONResponse

    async def handle(request, exc):
        logger.error(
            "internal error in %s %s: %s",
            request.method,
            request.scope.get("route").path if request.scope.get("route") else "?",
            type(exc).__name__,
            exc_info=exc,
        )
        return JSONResponse({"error": "internal error in the server; see its log"}, status_code=500)

    return handle
