"""One exception for every way a request can fail, carrying its gRPC status and a metrics `reason`."""

from __future__ import annotations

import grpc


class InferenceError(Exception):
    """A request failure a person can act on: the gRPC status code, the message, and a short metrics reason."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or code.name.lower()


def not_found(message: str) -> InferenceError:
    return InferenceError(grpc.StatusCode.NOT_FOUND, message, "not_found")


def invalid(message: str) -> InferenceError:
    return InferenceError(grpc.StatusCode.INVALID_ARGUMENT, message, "invalid_argument")


def unavailable(message: str) -> InferenceError:
    return InferenceError(grpc.StatusCode.UNAVAILABLE, message, "unavailable")
