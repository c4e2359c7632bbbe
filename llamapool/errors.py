"""Typed errors: each knows its HTTP status and its OpenAI error code."""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    """Every error code a client or a worker can name: the OpenAI `code` and the wire's."""

    INTERNAL_ERROR = "internal_error"
    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    INVALID_API_KEY = "invalid_api_key"
    MODEL_NOT_FOUND = "model_not_found"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TOO_LARGE = "request_too_large"
    GENERATION_FAILED = "generation_failed"
    WORKER_CRASHED = "worker_crashed"
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    MODEL_FAILED = "model_failed"
    INSUFFICIENT_MEMORY = "insufficient_memory"
    MODEL_UNLOADED = "model_unloaded"
    SHUTTING_DOWN = "shutting_down"
    # Refused by a draining (or full) worker: retried elsewhere, up to max_requeues.
    WORKER_BUSY = "worker_busy"
    REQUEST_TIMEOUT = "request_timeout"  # ran past the model's max_request_time
    # Worker → router only: the request ended without reaching the client as such.
    CANCELLED = "cancelled"  # the router asked for it; the client is gone


class LlamapoolError(Exception):
    """Base of every error a client may see; renders as an OpenAI error body."""

    status: int = 500
    code: ErrorCode = ErrorCode.INTERNAL_ERROR
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, int(round(self.retry_after))))}


class InvalidRequest(LlamapoolError):
    status, code, type = 400, ErrorCode.INVALID_REQUEST, "invalid_request_error"


class ContextLengthExceeded(LlamapoolError):
    status, code, type = 400, ErrorCode.CONTEXT_LENGTH_EXCEEDED, "invalid_request_error"


class Unauthorized(LlamapoolError):
    status, code, type = 401, ErrorCode.INVALID_API_KEY, "authentication_error"


class ModelNotFound(LlamapoolError):
    status, code, type = 404, ErrorCode.MODEL_NOT_FOUND, "invalid_request_error"


class NotFound(LlamapoolError):
    status, code, type = 404, ErrorCode.NOT_FOUND, "invalid_request_error"


class MethodNotAllowed(LlamapoolError):
    status, code, type = 405, ErrorCode.METHOD_NOT_ALLOWED, "invalid_request_error"


class RequestTooLarge(LlamapoolError):
    status, code, type = 413, ErrorCode.REQUEST_TOO_LARGE, "invalid_request_error"


class GenerationFailed(LlamapoolError):
    status, code, type = 500, ErrorCode.GENERATION_FAILED, "server_error"


class WorkerCrashed(LlamapoolError):
    status, code, type = 502, ErrorCode.WORKER_CRASHED, "server_error"


class QueueFull(LlamapoolError):
    status, code, type = 503, ErrorCode.QUEUE_FULL, "server_error"


class QueueTimeout(LlamapoolError):
    status, code, type = 503, ErrorCode.QUEUE_TIMEOUT, "server_error"


class ModelFailed(LlamapoolError):
    status, code, type = 503, ErrorCode.MODEL_FAILED, "server_error"


class InsufficientMemory(LlamapoolError):
    status, code, type = 503, ErrorCode.INSUFFICIENT_MEMORY, "server_error"


class ModelUnloaded(LlamapoolError):
    status, code, type = 503, ErrorCode.MODEL_UNLOADED, "server_error"


class ShuttingDown(LlamapoolError):
    status, code, type = 503, ErrorCode.SHUTTING_DOWN, "server_error"


class WorkerBusy(LlamapoolError):
    status, code, type = 503, ErrorCode.WORKER_BUSY, "server_error"


class RequestTimeout(LlamapoolError):
    status, code, type = 504, ErrorCode.REQUEST_TIMEOUT, "server_error"


_BY_CODE: dict[ErrorCode, type[LlamapoolError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        ContextLengthExceeded,
        Unauthorized,
        ModelNotFound,
        NotFound,
        MethodNotAllowed,
        RequestTooLarge,
        GenerationFailed,
        WorkerCrashed,
        QueueFull,
        QueueTimeout,
        ModelFailed,
        InsufficientMemory,
        ModelUnloaded,
        ShuttingDown,
        WorkerBusy,
        RequestTimeout,
    )
}


def error_from_code(code: str, message: str, *, param: str | None = None) -> LlamapoolError:
    """Rebuild a typed error from the code a worker sent over the wire."""
    cls = _BY_CODE.get(code, GenerationFailed)
    return cls(message, param=param)
