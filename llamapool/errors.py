"""Typed errors: each knows its HTTP status and its OpenAI error code."""

from __future__ import annotations

from typing import Any


class LlamapoolError(Exception):
    """Base of every error a client may see; renders as an OpenAI error body."""

    status: int = 500
    code: str = "internal_error"
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
    status, code, type = 400, "invalid_request", "invalid_request_error"


class ContextLengthExceeded(LlamapoolError):
    status, code, type = 400, "context_length_exceeded", "invalid_request_error"


class Unauthorized(LlamapoolError):
    status, code, type = 401, "invalid_api_key", "authentication_error"


class ModelNotFound(LlamapoolError):
    status, code, type = 404, "model_not_found", "invalid_request_error"


class NotFound(LlamapoolError):
    status, code, type = 404, "not_found", "invalid_request_error"


class MethodNotAllowed(LlamapoolError):
    status, code, type = 405, "method_not_allowed", "invalid_request_error"


class RequestTooLarge(LlamapoolError):
    status, code, type = 413, "request_too_large", "invalid_request_error"


class GenerationFailed(LlamapoolError):
    status, code, type = 500, "generation_failed", "server_error"


class WorkerCrashed(LlamapoolError):
    status, code, type = 502, "worker_crashed", "server_error"


class QueueFull(LlamapoolError):
    status, code, type = 503, "queue_full", "server_error"


class QueueTimeout(LlamapoolError):
    status, code, type = 503, "queue_timeout", "server_error"


class ModelFailed(LlamapoolError):
    status, code, type = 503, "model_failed", "server_error"


class InsufficientMemory(LlamapoolError):
    status, code, type = 503, "insufficient_memory", "server_error"


class ModelUnloaded(LlamapoolError):
    status, code, type = 503, "model_unloaded", "server_error"


class ShuttingDown(LlamapoolError):
    status, code, type = 503, "shutting_down", "server_error"


_BY_CODE: dict[str, type[LlamapoolError]] = {
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
    )
}


def error_from_code(code: str, message: str, *, param: str | None = None) -> LlamapoolError:
    """Rebuild a typed error from the code a worker sent over the wire."""
    cls = _BY_CODE.get(code, GenerationFailed)
    return cls(message, param=param)
