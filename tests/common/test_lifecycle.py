"""The one server lifecycle (services/common/serving.py) without a network: which states are ready and admit
requests, that health mirrors readiness, that a drain never goes back, and that the drain's wait ends when the
last tracked request does (or when the grace period does)."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from services.common.serving import DRAINING, SERVING, STARTING, STOPPED, STOPPING, Lifecycle

SERVING_, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(lifecycle: Lifecycle, name: str = "") -> int:
    class Context:
        async def abort(self, code, details):
            raise AssertionError(details)

    return (await lifecycle.health.Check(health_pb2.HealthCheckRequest(service=name), Context())).status


def test_states_decide_readiness_admission_and_health():
    async def run():
        lifecycle = Lifecycle(HealthServicer(), ["x.v1.Service"])
        await lifecycle.publish()
        seen = []
        for state in (STARTING, SERVING, DRAINING, STOPPING, STOPPED):
            await lifecycle.to(state)
            seen.append(
                (
                    state,
                    lifecycle.ready,
                    lifecycle.admitting,
                    await _health(lifecycle),
                    await _health(lifecycle, "x.v1.Service"),
                )
            )
        assert seen == [
            (STARTING, False, False, NOT_SERVING, NOT_SERVING),
            (SERVING, True, True, SERVING_, SERVING_),
            (DRAINING, False, True, NOT_SERVING, NOT_SERVING),  # not ready, still answering: the drain delay
            (STOPPING, False, False, NOT_SERVING, NOT_SERVING),
            (STOPPED, False, False, NOT_SERVING, NOT_SERVING),
        ]
        await lifecycle.to(SERVING)
        assert lifecycle.state == STOPPED, "a drained server never serves again"

    asyncio.run(run())


def test_dependency_readiness_only_matters_while_serving():
    async def run():
        lifecycle = Lifecycle(HealthServicer(), [])
        await lifecycle.to(SERVING)
        await lifecycle.set_dependency_ready(False)
        assert not lifecycle.ready and lifecycle.admitting and await _health(lifecycle) == NOT_SERVING
        await lifecycle.set_dependency_ready(True)
        assert lifecycle.ready and await _health(lifecycle) == SERVING_
        await lifecycle.to(DRAINING)
        await lifecycle.set_dependency_ready(True)
        assert not lifecycle.ready and await _health(lifecycle) == NOT_SERVING

    asyncio.run(run())


def test_idle_waits_for_the_tracked_requests_and_no_longer_than_the_grace():
    async def run():
        lifecycle = Lifecycle(HealthServicer(), [])
        assert await lifecycle.idle(0)
        release = asyncio.Event()
        finished = []

        async def request(i):
            with lifecycle.track():
                await release.wait()
                finished.append(i)

        tasks = [asyncio.create_task(request(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert lifecycle.in_flight == 3
        assert not await lifecycle.idle(0.01), "the grace period ran out with requests running"
        waiter = asyncio.create_task(lifecycle.idle(60))
        release.set()
        assert await waiter and sorted(finished) == [0, 1, 2] and lifecycle.in_flight == 0
        await asyncio.gather(*tasks)

    asyncio.run(run())
