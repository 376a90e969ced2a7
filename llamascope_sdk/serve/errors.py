"""HTTP errors of the server: one line naming the field, in the OpenAI error shape.

:func:`http_error` maps the SDK's own errors to status codes: bad input 400, an unknown SAE or
model 404, a full queue or SAE budget 429 (with ``Retry-After``).
"""

from __future__ import annotations

from typing import Any

from llamascope_sdk.base.errors import (
    FeatureIndexError,
    IncompatibleModelError,
    InputError,
    PoolBusyError,
    SaeBudgetError,
    SaeNotFoundError,
    UnknownSaeError,
)

#: seconds a client is told to wait after a 429
RETRY_AFTER = 1


class HttpError(Exception):
    """An error answer: ``status``, one-line ``message``, the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message.splitlines()[0] if message else "error"
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_error", 503: "server_unavailable"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.status}}


def busy(message: str) -> HttpError:
    return HttpError(429, message, headers={"Retry-After": str(RETRY_AFTER)})


def http_error(exc: BaseException, param: str | None = None) -> HttpError:
    """The HTTP answer for an SDK error raised while reading field ``param``."""
    if isinstance(exc, HttpError):
        return exc
    where = f"{param}: " if param else ""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, (UnknownSaeError, SaeNotFoundError)):
        return HttpError(404, f"{where}{text}", param)
    if isinstance(exc, PoolBusyError):
        return busy(f"{where}{text}")
    if isinstance(exc, (SaeBudgetError, InputError, FeatureIndexError, IncompatibleModelError,
                        ValueError, TypeError)):
        return HttpError(400, f"{where}{text}", param)
    return HttpError(500, f"{where}{type(exc).__name__}: {text}", param)
