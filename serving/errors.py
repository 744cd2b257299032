"""Errors that end a call with a specific gRPC status code and a message saying what was wrong."""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """Base class: `code` is the gRPC status the call ends with, str(error) its details."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(ServingError):
    """The model exists but cannot do this (e.g. Generate on a denoiser, Generate without latents on an ae)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Internal(ServingError):
    code = grpc.StatusCode.INTERNAL
