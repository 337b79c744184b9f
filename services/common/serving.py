"""gRPC server plumbing shared by the services: server options, health and reflection, the Prometheus HTTP
endpoint, and a graceful SIGTERM shutdown that turns readiness off before it drains.

Shutdown order on SIGTERM (or SIGINT): readiness false (grpc.health.v1 NOT_SERVING and the service's own ready
flag) -> optional drain delay while still answering, so load balancers notice -> the service drains its queued
and running requests within the grace period -> the gRPC server stops (whatever is still running gets the rest
of the grace period) -> exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)


def create_server(max_message_bytes: int, *, max_send_bytes: int | None = None,
                  interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """A grpc.aio server with message size limits on both directions (`max_send_bytes` when the answers may be
    larger than the requests) and `interceptors` (e.g. token authentication), which grpc.aio takes only here."""
    return grpc.aio.server(interceptors=list(interceptors), options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_send_bytes or max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
    ])


class Readiness:
    """The one readiness flag of a server, mirrored into grpc.health.v1 for every service name (and "")."""

    def __init__(self, health: HealthServicer, service_names: Iterable[str]):
        self.health = health
        self.service_names = ["", *service_names]
        self.ready = False

    async def set(self, ready: bool) -> None:
        self.ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.service_names:
            await self.health.set(name, status)


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> Readiness:
    """Register grpc.health.v1 and server reflection; returns the readiness flag.

    Call `await readiness.set(False)` before starting the server and `set(True)` once it can serve.
    """
    service_names = list(service_names)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    return Readiness(health, service_names)


def start_metrics_server(port: int, registry, host: str = "0.0.0.0") -> int:
    """Serve /metrics over HTTP from a daemon thread; returns the bound port (0 picks a free one; -1: off, returns -1)."""
    if port < 0:
        return -1
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port


async def serve_until_terminated(
    server: grpc.aio.Server,
    readiness: Readiness,
    *,
    grace_period_s: float,
    drain_delay_s: float = 0.0,
    drain: Callable[[float], Awaitable[None]] | None = None,
    stop_event: asyncio.Event | None = None,
) -> None:
    """Wait for SIGTERM/SIGINT (or `stop_event`), then shut down in the order described above."""
    loop = asyncio.get_running_loop()
    stop = stop_event or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (e.g. embedded in a test)
            pass
    await stop.wait()
    start = time.monotonic()
    await readiness.set(False)
    log.info("shutting down: readiness false; draining for up to %.1f s", grace_period_s)
    if drain_delay_s > 0:
        await asyncio.sleep(drain_delay_s)
    if drain is not None:
        try:
            await asyncio.wait_for(drain(grace_period_s), grace_period_s)
        except TimeoutError:
            log.warning("grace period of %.1f s ran out with requests still running", grace_period_s)
    await server.stop(max(0.0, grace_period_s - (time.monotonic() - start)))
    log.info("server stopped after %.2f s", time.monotonic() - start)
