"""services/common/errors.py: ServiceError and @aborts_on_error on a real grpc.aio server (health's service
descriptor lent as a tiny servicer): the status and message a caller sees, for unary and streaming methods."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import (
    HTTP_STATUS,
    ServiceError,
    aborts_on_error,
    exhausted,
    invalid,
    not_found,
    unavailable,
)


class Scripted(health_pb2_grpc.HealthServicer):
    """Check answers by the requested service name; Watch streams one answer, then fails the same way."""

    @aborts_on_error
    async def Check(self, request, context):
        if request.service == "self-abort":  # a method that aborts by itself keeps its own status
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")
        return self._answer(request.service)

    @aborts_on_error
    async def Watch(self, request, context):
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        yield self._answer(request.service)

    def _answer(self, service: str):
        if service == "invalid":
            raise invalid("image refused (truncated): cut off after 10 bytes", "truncated")
        if service == "bug":
            raise KeyError("secret request contents")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def _calls() -> dict:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(Scripted(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("ok", "invalid", "bug", "self-abort"):
                try:
                    results[name] = (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)).status
                except grpc.aio.AioRpcError as e:
                    results[name] = (e.code(), e.details())
            answers = []
            try:
                async for answer in stub.Watch(health_pb2.HealthCheckRequest(service="invalid"), timeout=10):
                    answers.append(answer.status)
            except grpc.aio.AioRpcError as e:
                answers.append((e.code(), e.details()))
            results["stream"] = answers
    finally:
        await server.stop(0)
    return results


def test_a_service_error_aborts_with_its_code_and_message_and_a_bug_is_internal(caplog):
    results = asyncio.run(_calls())
    assert results["ok"] == health_pb2.HealthCheckResponse.SERVING
    assert results["invalid"] == (grpc.StatusCode.INVALID_ARGUMENT, "image refused (truncated): cut off after 10 bytes")
    code, message = results["bug"]
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message and "see its log" in message
    assert "internal error in Scripted.Check" in caplog.text
    assert results["self-abort"] == (grpc.StatusCode.PERMISSION_DENIED, "not yours")
    assert results["stream"] == [health_pb2.HealthCheckResponse.SERVING, results["invalid"]]


@pytest.mark.parametrize(
    "make, code, reason, http",
    [
        (invalid, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", 400),
        (not_found, grpc.StatusCode.NOT_FOUND, "not_found", 404),
        (unavailable, grpc.StatusCode.UNAVAILABLE, "unavailable", 503),
        (exhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, "resource_exhausted", 429),
    ],
)
def test_the_helpers_and_the_http_mapping(make, code, reason, http):
    error = make("what happened")
    assert (error.code, error.message, error.reason, error.http_status) == (code, "what happened", reason, http)
    assert ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "late").reason == "deadline_exceeded"
    assert set(HTTP_STATUS) == set(grpc.StatusCode), "every gRPC code has an HTTP status"
