"""gRPC server plumbing shared by the services: server options, health and reflection, the Prometheus HTTP
endpoint, and the server's one lifecycle.

A server is in one state (`Lifecycle.state`): starting -> serving -> draining -> stopping -> stopped. Health
(grpc.health.v1), the service's own ready answer (KServe ServerReady) and request admission derive from it:

- ready (SERVING in health, ServerReady true): serving, and what the service depends on is ready;
- admitting (new requests accepted): serving or draining; starting, stopping or stopped refuse with UNAVAILABLE.

Shutdown on SIGTERM (or SIGINT): draining: readiness false at once while requests are still answered for the
drain delay (load balancers and gateways notice and send new work elsewhere) -> stopping: new requests are
refused with UNAVAILABLE (a client retries another replica) and the accepted ones finish within the grace
period (the one wait) -> the gRPC server stops (what still runs is cancelled) -> stopped -> exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)


def create_server(
    max_message_bytes: int,
    *,
    max_send_bytes: int | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    """A grpc.aio server with message size limits on both directions (`max_send_bytes` when the answers may be
    larger than the requests) and `interceptors` (e.g. token authentication), which grpc.aio takes only here."""
    return grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_send_bytes or max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ],
    )


STARTING, SERVING, DRAINING, STOPPING, STOPPED = "starting", "serving", "draining", "stopping", "stopped"
_ORDER = (STARTING, SERVING, DRAINING, STOPPING, STOPPED)


class Lifecycle:
    """The one state of a server, mirrored into grpc.health.v1 for every service name (and "").

    `dependency_ready` is what the service needs besides itself (the gateway: a ready inference replica).
    Requests are counted with `track()` after `admitting` said yes, so a drain can wait for exactly them."""

    def __init__(self, health: HealthServicer, service_names: Iterable[str]):
        self.health = health
        self.service_names = ["", *service_names]
        self.state = STARTING
        self.dependency_ready = True
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._published: bool | None = None

    @property
    def ready(self) -> bool:
        """Ready for new traffic: serving, and its dependency ready. False from the first moment of a drain."""
        return self.state == SERVING and self.dependency_ready

    @property
    def admitting(self) -> bool:
        """New requests are accepted: while serving, and through the drain delay."""
        return self.state in (SERVING, DRAINING)

    @contextlib.contextmanager
    def track(self):
        """Count one admitted request while it runs (check `admitting` first, with no await in between)."""
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def idle(self, timeout: float) -> bool:
        """Wait until no tracked request runs, at most `timeout` seconds; True when none is left."""
        if self.in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout))
        except TimeoutError:
            return False
        return True

    async def to(self, state: str) -> None:
        """Move to `state` (forward only: a server that started to drain never serves again)."""
        if _ORDER.index(state) > _ORDER.index(self.state):
            self.state = state
        await self.publish()

    async def set_dependency_ready(self, ready: bool) -> None:
        self.dependency_ready = ready
        await self.publish()

    async def publish(self) -> None:
        """Mirror the state into grpc.health.v1 (call once before the server starts: it is NOT_SERVING until then)."""
        ready = self.ready
        if ready == self._published:
            return
        self._published = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.service_names:
            await self.health.set(name, status)


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> Lifecycle:
    """Register grpc.health.v1 and server reflection; returns the server's lifecycle (starting: NOT_SERVING).

    `await lifecycle.publish()` before starting the server, `await lifecycle.to(SERVING)` once it can serve;
    `serve_until_terminated` does the rest.
    """
    service_names = list(service_names)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    return Lifecycle(health, service_names)


def start_metrics_server(port: int, registry, host: str = "0.0.0.0") -> int:
    """Serve /metrics over HTTP from a daemon thread; returns the bound port (0 picks a free one; -1: off, returns -1)."""
    if port < 0:
        return -1
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port


async def serve_until_terminated(
    server: grpc.aio.Server,
    lifecycle: Lifecycle,
    *,
    grace_period_s: float,
    drain_delay_s: float = 0.0,
    stop_event: asyncio.Event | None = None,
) -> None:
    """Wait for SIGTERM/SIGINT (or `stop_event`), then drain in the order described above."""
    loop = asyncio.get_running_loop()
    stop = stop_event or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (e.g. embedded in a test)
            pass
    await stop.wait()
    start = time.monotonic()
    await lifecycle.to(DRAINING)
    log.info("shutting down: readiness false; still answering for the drain delay of %.1f s", drain_delay_s)
    if drain_delay_s > 0:
        await asyncio.sleep(drain_delay_s)
    await lifecycle.to(STOPPING)
    log.info(
        "shutting down: refusing new requests; %d accepted ones get up to %.1f s to finish",
        lifecycle.in_flight,
        grace_period_s,
    )
    drained_at = time.monotonic()
    if not await lifecycle.idle(grace_period_s):
        log.warning(
            "grace period of %.1f s ran out with %d requests still running: they are cancelled",
            grace_period_s,
            lifecycle.in_flight,
        )
    # calls that are no requests (health, metadata) get what is left of the grace period
    await server.stop(max(0.0, grace_period_s - (time.monotonic() - drained_at)))
    await lifecycle.to(STOPPED)
    log.info("server stopped after %.2f s", time.monotonic() - start)
