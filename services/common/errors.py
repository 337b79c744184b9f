"""The services' one error type, and the one place a gRPC call is aborted with it.

A `ServiceError` carries what a caller needs (the status `code` and a `message` a person can act on) and what
operators count (a short `reason`, the metrics label). Code anywhere in a request's path raises it; the servicer
methods are decorated with `@aborts_on_error`, which turns it into the call's status (MLServer's
`handle_mlserver_error` is the same shape). Transports other than gRPC map the same type: `http_status` is the
HTTP status of each code (grpc-gateway's table), for the gateway's HTTP API; the inference service's KServe v2
REST answers Triton's own codes instead (`services/inference/rest.py` TRITON_HTTP_STATUS).
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

log = logging.getLogger("cxr.errors")

# gRPC status -> HTTP status, grpc-gateway's table (the gateway's HTTP/JSON API; inference REST uses Triton's).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


class ServiceError(Exception):
    """A request failure: the status `code`, the `message` the caller gets, and a short metrics `reason`
    (default: the code's name in lower case)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or code.name.lower()

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def __repr__(self) -> str:
        return f"ServiceError({self.code.name}, {self.message!r}, reason={self.reason!r})"


def invalid(message: str, reason: str = "invalid_argument") -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, reason)


def not_found(message: str, reason: str = "not_found") -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message, reason)


def unavailable(message: str, reason: str = "unavailable") -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message, reason)


def exhausted(message: str, reason: str = "resource_exhausted") -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason)


def aborts_on_error(method):
    """Decorate an async servicer method (unary, or an async generator for streams): a `ServiceError` aborts the
    call with its code and message; any other exception is a bug of ours, logged with its trace and answered
    INTERNAL (the message never quotes the request). Aborts the method made itself pass through unchanged."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for answer in method(self, request, context):
                    yield answer
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await _abort(context, e, method)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(context, e, method)

    return unary


async def _abort(context, error: Exception, method) -> None:
    if isinstance(error, ServiceError):
        await context.abort(error.code, error.message)
    log.error("internal error in %s", method.__qualname__, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error in the server; see its log")
