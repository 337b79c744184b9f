"""The inference replicas behind the gateway's upstream target, each with its own channel and readiness.

`dns:///inference:8001` (a headless Service: one address per pod), `host:port` or `ipv4:a:p,b:q` is resolved
here, again on every readiness poll, and each address gets a channel of its own. That is what lets the gateway

- be ready when *any* replica is (one draining pod does not take the gateways out of service),
- send new work to ready replicas first, and to a not-ready one that still answers (a replica in its drain delay)
  only when no replica is ready,
- retry a call that a replica refused (UNAVAILABLE while it drains, or CANCELLED as it stops) on *another* one,
- fail fast when every replica is known to hang (its readiness checks time out: a SIGSTOPped or wedged process)
  instead of waiting out the caller's deadline, and hand calls already waiting on a hung replica to another.

Targets grpc resolves in other ways (`unix:`, `xds:` ...) are one replica with the target as it is.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from cxr.generated.inference import grpc_service_pb2 as pb
from cxr.generated.inference import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger("cxr.gateway.upstream")

READY, NOT_READY, DOWN, HUNG = "ready", "not_ready", "down", "hung"
HUNG_AFTER = 2  # consecutive readiness checks that time out before a replica counts as hung


class ReplicaHung(Exception):
    """A call abandoned because its replica stopped answering (its readiness checks time out)."""


@dataclass(eq=False)
class Replica:
    """One address of the upstream: its channel, and what its readiness checks last said."""

    address: str  # for logs: "10.0.0.5:8001"
    channel: grpc.aio.Channel
    stub: pb_grpc.GRPCInferenceServiceStub
    state: str = DOWN  # from readiness checks only (so one refused call cannot flip the gateway's health)
    timeouts: int = 0
    refused_at: float = -1e9  # when a call last came back UNAVAILABLE/CANCELLED: picked last for a while
    calls: set = field(default_factory=set)

    async def call(self, method: str, request, timeout: float, metadata):
        call = getattr(self.stub, method)(request, timeout=timeout, metadata=metadata)
        self.calls.add(call)
        try:
            return await call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our own caller gave up: not the replica's doing
            raise ReplicaHung(self.address) from None  # cancelled by mark_hung below
        finally:
            self.calls.discard(call)

    def abandon_calls(self) -> None:
        for call in list(self.calls):
            call.cancel()


def parse_target(target: str) -> tuple[str, int] | list[str] | None:
    """(host, port) to resolve; a list of fixed "ipv4:"/"ipv6:" channel targets; None: let grpc resolve it."""
    if target.startswith("dns:"):
        rest = target[4:]
        if rest.startswith("//"):
            rest = rest[2:].split("/", 1)[-1]  # dns://[authority]/host:port
        target = rest
    elif target.startswith(("ipv4:", "ipv6:")):
        scheme, _, addresses = target.partition(":")
        return [f"{scheme}:{a.strip()}" for a in addresses.split(",") if a.strip()]
    elif ":/" in target or target.split(":", 1)[0] in ("unix", "unix-abstract", "vsock", "xds", "google-c2p"):
        return None
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _channel_target(ip: str, port: int) -> str:
    return f"ipv6:[{ip}]:{port}" if ":" in ip else f"ipv4:{ip}:{port}"


class ReplicaSet:
    """The replicas of one upstream target. `refresh()` (called by the gateway's readiness poll) re-resolves the
    target and checks every replica; `pick()` chooses the replica for the next attempt of a call."""

    def __init__(
        self,
        target: str,
        make_channel: Callable[[str, str | None], grpc.aio.Channel],
        metadata,
        check_timeout_s: float = 1.0,
    ):
        self.target = target
        self._make_channel = make_channel  # (channel target, TLS name of the original host or None)
        self._metadata = metadata
        self._check_timeout_s = check_timeout_s
        self._parsed = parse_target(target)
        self.replicas: dict[str, Replica] = {}
        self._turn = itertools.count()
        self._refused_for_s = 1.0
        if not isinstance(self._parsed, tuple):  # fixed addresses, or a target only grpc can resolve
            for channel_target in self._parsed or [target]:
                self._add(channel_target, channel_target.split(":", 1)[-1] if self._parsed else target, None)

    def _add(self, channel_target: str, address: str, tls_name: str | None) -> None:
        channel = self._make_channel(channel_target, tls_name)
        self.replicas[channel_target] = Replica(address, channel, pb_grpc.GRPCInferenceServiceStub(channel))

    @property
    def ready(self) -> bool:
        """Some replica's last readiness check said ready."""
        return any(r.state == READY for r in self.replicas.values())

    async def refresh(self) -> None:
        if isinstance(self._parsed, tuple):
            await self._resolve(*self._parsed)
        await asyncio.gather(*(self._check(r) for r in list(self.replicas.values())))

    async def _resolve(self, host: str, port: int) -> None:
        try:
            ipaddress.ip_address(host)
            addresses = [host]
            tls_name = None
        except ValueError:
            tls_name = host
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                if not self.replicas:
                    log.warning(
                        "cannot resolve the inference target",
                        extra={"fields": {"target": self.target, "error": str(exc)}},
                    )
                return  # keep the replicas we know (a DNS hiccup must not empty the set)
            addresses = list(dict.fromkeys(info[4][0] for info in infos))
        wanted = {_channel_target(ip, port): ip for ip in addresses}
        for gone in set(self.replicas) - set(wanted):
            replica = self.replicas.pop(gone)
            log.info("inference replica gone", extra={"fields": {"address": replica.address}})
            asyncio.get_running_loop().create_task(replica.channel.close(grace=5.0))
        for channel_target, ip in wanted.items():
            if channel_target not in self.replicas:
                self._add(channel_target, f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}", tls_name)

    async def _check(self, replica: Replica) -> None:
        try:
            answer = await replica.stub.ServerReady(
                pb.ServerReadyRequest(), timeout=self._check_timeout_s, metadata=self._metadata
            )
            state, replica.timeouts = (READY if answer.ready else NOT_READY), 0
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                replica.timeouts += 1
                state = HUNG if replica.timeouts >= HUNG_AFTER else replica.state
            elif exc.code() == grpc.StatusCode.UNAVAILABLE:
                state, replica.timeouts = DOWN, 0
            else:  # it answers, though not as we hoped (e.g. UNAUTHENTICATED: a wrong token)
                state, replica.timeouts = NOT_READY, 0
        if state != replica.state:
            log.info(
                "inference replica state changed",
                extra={"fields": {"address": replica.address, "from": replica.state, "to": state}},
            )
            replica.state = state
            if state == HUNG:
                replica.abandon_calls()

    def pick(self, tried: set[Replica]) -> tuple[Replica | None, bool]:
        """The replica for the next attempt, and whether this call has not tried it yet.

        Ready replicas first, then ones that answer but are not ready (draining or starting), then ones that are
        down or just refused a call; hung ones never. Round robin among equals. (None, False): nothing to call."""
        now = time.monotonic()

        def rank(r: Replica) -> int:
            refused = now - r.refused_at < self._refused_for_s
            return {READY: 0, NOT_READY: 1}.get(r.state, 2) + (2 if refused else 0)

        usable = [r for r in self.replicas.values() if r.state != HUNG]
        if not usable:
            return None, False
        fresh = [r for r in usable if r not in tried]
        pool = fresh or usable
        best = min(rank(r) for r in pool)
        candidates = [r for r in pool if rank(r) == best]
        return candidates[next(self._turn) % len(candidates)], bool(fresh)

    def refused(self, replica: Replica) -> None:
        replica.refused_at = time.monotonic()

    async def close(self) -> None:
        await asyncio.gather(*(r.channel.close() for r in self.replicas.values()))
