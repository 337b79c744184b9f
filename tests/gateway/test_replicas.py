"""The gateway's replica set without servers: how targets are parsed, and which replica the next attempt of a call
goes to (ready first, then answering-but-not-ready, then down or just refused; hung never; round robin among equals)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.gateway.replicas import DOWN, HUNG, NOT_READY, READY, ReplicaSet, parse_target


@pytest.mark.parametrize(
    "target,parsed",
    [
        ("dns:///inference:8001", ("inference", 8001)),
        ("dns://10.0.0.10/inference.cxr.svc:8001", ("inference.cxr.svc", 8001)),
        ("localhost:8001", ("localhost", 8001)),
        ("[::1]:8001", ("::1", 8001)),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", ["ipv4:127.0.0.1:1", "ipv4:127.0.0.2:2"]),
        ("unix:/run/inference.sock", None),
        ("no-port", None),
    ],
)
def test_parse_target(target, parsed):
    assert parse_target(target) == parsed


def _set(states: list[str]) -> ReplicaSet:
    targets = ",".join(f"127.0.0.1:{9000 + i}" for i in range(len(states)))
    replicas = ReplicaSet(f"ipv4:{targets}", lambda target, _name: grpc.aio.insecure_channel(target), [])
    for replica, state in zip(replicas.replicas.values(), states):
        replica.state = state
    return replicas


def test_pick_prefers_ready_then_answering_and_never_hung():
    async def run():
        replicas = _set([NOT_READY, READY, DOWN, HUNG, READY])
        r = list(replicas.replicas.values())
        picked = {replicas.pick(set())[0] for _ in range(10)}
        assert picked == {r[1], r[4]}, "round robin over the ready ones"
        assert replicas.ready
        assert replicas.pick({r[1], r[4]}) == (r[0], True), "then one that answers but is not ready (draining)"
        assert replicas.pick({r[0], r[1], r[4]}) == (r[2], True), "then a down one: it may be back"
        again, fresh = replicas.pick({r[0], r[1], r[2], r[4]})
        assert again in (r[1], r[4]) and not fresh, "all tried: the best again (after a backoff); the hung one never"
        replicas.refused(r[1])
        assert {replicas.pick(set())[0] for _ in range(6)} == {r[4]}, "a replica that just refused a call comes last"
        await replicas.close()

    asyncio.run(run())


def test_all_hung_means_nothing_to_call_and_not_ready():
    async def run():
        replicas = _set([HUNG, HUNG])
        assert replicas.pick(set()) == (None, False) and not replicas.ready
        await replicas.close()

    asyncio.run(run())
