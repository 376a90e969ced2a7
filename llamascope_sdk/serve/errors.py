"""HTTP errors of the server: one line naming the field, in the OpenAI error shape.

The scheduler and the library raise their own errors (:class:`QueueFullError`,
:class:`ShuttingDownError`, the SDK's errors); :func:`http_error` maps them by class to a status
code: bad input 400, an unknown SAE or model 404, a full queue 429 (with ``Retry-After``), a
server shutting down 503. Which request field an error is about comes from where it was raised
(the caller passes ``param``) or from the error's own ``field`` attribute, never from its text.

A client never sees host detail (cache paths, endpoint URLs, exception text of an unexpected
failure): those answers say that the server's log has the detail, and the log
(``logging.getLogger("llamascope_sdk.serve")``) gets it.
"""

from __future__ import annotations

import logging
from typing import Any

from llamascope_sdk.base.errors import (
    FeatureIndexError,
    IncompatibleModelError,
    InputError,
    LlamascopeError,
    PoolBusyError,
    SaeBudgetError,
    SaeNotFoundError,
    UnknownSaeError,
)

log = logging.getLogger("llamascope_sdk.serve")

#: seconds a client is told to wait after a 429
RETRY_AFTER = 1

_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "request_too_large", 415: "unsupported_media_type",
          429: "rate_limit_error", 503: "server_unavailable"}


class QueueFullError(LlamascopeError, RuntimeError):
    """The scheduler's queue holds ``max_queue`` requests already; try again later."""


class ShuttingDownError(LlamascopeError, RuntimeError):
    """The scheduler is stopping and takes no new work."""


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
        return {"error": {"message": self.message, "type": _KINDS.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}


def busy(message: str) -> HttpError:
    return HttpError(429, message, headers={"Retry-After": str(RETRY_AFTER)})


def internal(exc: BaseException, param: str | None = None) -> HttpError:
    """A 500 that names no host detail; the log gets the exception and its traceback."""
    log.error("request failed (%s)", param or "request", exc_info=exc)
    where = f"{param}: " if param else ""
    return HttpError(500, f"{where}internal error ({type(exc).__name__}); the server log has "
                          "the detail", param)


def field_of(exc: BaseException, param: str | None) -> str | None:
    """The request field an error is about: its own ``field`` (set by the code that raised
    it, relative to ``param`` or whole) or ``param``."""
    own = getattr(exc, "field", None)
    if not isinstance(own, str) or not own:
        return param
    if param is None or own.startswith(param):
        return own
    return f"{param}.{own}"


def http_error(exc: BaseException, param: str | None = None) -> HttpError:
    """The HTTP answer for an error raised while handling field ``param``."""
    if isinstance(exc, HttpError):
        return exc
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, QueueFullError):
        return busy(text)
    if isinstance(exc, ShuttingDownError):
        return HttpError(503, text)
    where = field_of(exc, param)
    prefix = f"{where}: " if where else ""
    if isinstance(exc, PoolBusyError):
        return busy(f"{prefix}{text}")
    if isinstance(exc, (UnknownSaeError, SaeNotFoundError)):
        return HttpError(404, f"{prefix}{text}", where)
    if isinstance(exc, (SaeBudgetError, InputError, FeatureIndexError, IncompatibleModelError,
                        TypeError)) or type(exc) is ValueError:
        return HttpError(400, f"{prefix}{text}", where)
    return internal(exc, where)
