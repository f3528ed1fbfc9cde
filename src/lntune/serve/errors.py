"""Errors the server answers with, as OpenAI's error object ``{"error": {"message", "type", "code", "param"}}``."""

from __future__ import annotations


class APIError(Exception):
    """A request that cannot be served: an HTTP status and OpenAI's error fields.

    Args:
        status: The HTTP status code.
        message: What went wrong and what to do, naming the adapter, field or file at fault.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ``server_error``).
        code: A short machine-readable code (``model_not_found``, ``adapter_load_failed``...).
        param: The request field at fault, if any.
        headers: Extra HTTP headers of the answer (``Retry-After`` for 429 and 503).

    Example:
        >>> raise APIError(404, "The model 'x' does not exist.", code="model_not_found", param="model")
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict:
        """The JSON body: OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """A 400: the request itself is wrong (bad value, input too long, unsupported option)."""
    return APIError(400, message, code=code, param=param)


def not_found(message: str, param: str | None = "model") -> APIError:
    """A 404: the named model (adapter) does not exist."""
    return APIError(404, message, code="model_not_found", param=param)


def adapter_failed(message: str) -> APIError:
    """A 500: the adapter's files on the server cannot be loaded (the message names the file)."""
    return APIError(500, message, type="server_error", code="adapter_load_failed")


def overloaded(message: str, retry_after: int = 1) -> APIError:
    """A 429: the queue is full; the client should retry after ``retry_after`` seconds."""
    return APIError(429, message, type="server_error", code="overloaded", headers={"Retry-After": str(retry_after)})


def not_ready(message: str, retry_after: int = 5) -> APIError:
    """A 503: the server is starting (the model is loading) or stopping."""
    return APIError(503, message, type="server_error", code="not_ready", headers={"Retry-After": str(retry_after)})


def timed_out(message: str) -> APIError:
    """A 504: the request did not finish within ``--request-timeout``."""
    return APIError(504, message, type="server_error", code="request_timeout")
