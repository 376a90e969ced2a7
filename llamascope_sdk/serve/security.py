"""What the server lets in, decided before any work: the HTTP guard and the SAE allow-list.

:class:`Guard` is an ASGI middleware in front of every endpoint. It answers, in this order:

* 403 when the ``Host`` header is not a loopback name (``localhost``, ``127.0.0.1``, ``::1``)
  nor one the operator listed (``--allowed-host``): a web page that re-binds its own domain to
  127.0.0.1 (DNS rebinding) sends its own name as ``Host``;
* 403 when an ``Origin`` header (sent by browsers) names another host: a cross-site request;
* 401 without the API key (every endpoint but ``/health``);
* 415 when a request with a body is not ``application/json``: browsers send ``text/plain``,
  form and multipart bodies cross-site without asking first, JSON only after a preflight that
  this server never grants (it sends no CORS headers);
* 413 when the body is larger than ``max_body`` bytes, read no further.

:class:`SaeAllowList` says which SAE names a request may use: the SAEs named at start, names
matching the operator's ``--allow-sae`` patterns, and folders inside ``--allow-sae-dir``. The
check reads only the name (never the file system, never the network), so a name that is not
allowed gets the same 404 whether such an SAE or path exists or not.
"""

from __future__ import annotations

import fnmatch
import hmac
import json
import os
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamascope_sdk.base.errors import InputError
from llamascope_sdk.loading.demo import DEMO_ALIASES, is_demo

from .errors import HttpError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Host names that always reach this machine and no other
LOOPBACK = ("localhost", "127.0.0.1", "::1")
#: default largest request body, in bytes (1 MiB)
MAX_BODY = 2**20
#: default largest prompt of one request: characters of text plus token ids, all prompts summed
MAX_PROMPT_CHARS = 100_000
#: longest SAE name a request may give (a folder path included)
MAX_NAME_CHARS = 1024
#: paths answered without the API key
_PUBLIC = ("/health",)


def check_api_key(key: str | None) -> str | None:
    """``key`` as the server uses it: None (no key) or a non-empty key.

    Raises:
        InputError: an empty or blank key, which would otherwise turn authentication off.
    """
    if key is not None and not key.strip():
        raise InputError("the API key is empty; give a key (--api-key or LLAMASCOPE_API_KEY), "
                         "or leave both unset to serve without one")
    return key


def host_name(header: str) -> str | None:
    """The host of a ``Host`` header value (``name``, ``name:port``, ``[v6]:port``), lower
    case, without the port; None when it is not of that shape."""
    text = header.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1:] and not text[end + 1:].startswith(":")):
            return None
        return text[1:end] or None
    name, _, port = text.partition(":")
    if not name or (port and not port.isdigit()):
        return None
    return name.rstrip(".")


def origin_host(origin: str) -> str | None:
    """The host of an ``Origin`` header (``scheme://host[:port]``); None for ``null`` or junk."""
    scheme, sep, rest = origin.strip().partition("://")
    if not sep or not scheme:
        return None
    return host_name(rest.split("/", 1)[0])


@dataclass(frozen=True)
class GuardPolicy:
    """The guard's settings: the API key, the extra host names, the body limit."""

    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_body: int = MAX_BODY

    def __post_init__(self) -> None:
        check_api_key(self.api_key)
        if self.max_body < 1:
            raise InputError(f"the body limit must be at least 1 byte, got {self.max_body}")

    def host_ok(self, host: str | None) -> bool:
        names = {*LOOPBACK, *(h.strip().lower().strip("[]") for h in self.allowed_hosts)}
        return host is not None and host in names

    def refusal(self, scope: Scope) -> HttpError | None:
        """Why a request is refused before its body is read, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if host is None or not self.host_ok(host_name(host)):
            return HttpError(403, f"Host {_short(host)} is not allowed: this server answers to "
                                  "localhost, 127.0.0.1, ::1 and the names its operator gave "
                                  "with --allowed-host")
        origin = headers.get("origin")
        if origin is not None and not self.host_ok(origin_host(origin)):
            return HttpError(403, f"cross-site request refused: Origin {_short(origin)} is "
                                  "not this server")
        if scope.get("path") not in _PUBLIC and not self._key_ok(headers):
            return HttpError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                             headers={"WWW-Authenticate": "Bearer"})
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return None
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            return HttpError(415, f"request bodies must be application/json, got "
                                  f"{_short(media or None)}")
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > self.max_body:
            return too_large(self.max_body)
        return None

    def _key_ok(self, headers: dict[str, str]) -> bool:
        if self.api_key is None:
            return True
        got = headers.get("authorization", "").encode()
        return hmac.compare_digest(got, f"Bearer {self.api_key}".encode())


def too_large(limit: int) -> HttpError:
    return HttpError(413, f"the request body is larger than this server's limit of {limit} "
                          "bytes (--max-body)")


def _short(value: str | None, n: int = 60) -> str:
    if value is None:
        return "(none)"
    return repr(value if len(value) <= n else value[:n] + "...")


class Guard:
    """The ASGI middleware of the module docstring. A body within the limit is read whole
    before the application runs and handed to it again; later ``receive`` calls (a client's
    disconnect) go to the server as before."""

    def __init__(self, app: Callable[..., Awaitable[None]], policy: GuardPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self.policy.refusal(scope)
        if refused is not None:
            await send_error(send, refused)
            return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive, self.policy.max_body)
        if body is _LEFT:
            return  # the client went away while sending: nobody to answer
        if body is None:
            await send_error(send, too_large(self.policy.max_body))
            return
        await self.app(scope, _replay(body, receive), send)


_LEFT = b"\0left"  # _read_body's answer when the client disconnected (compared by identity)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body; None as soon as it passes ``limit`` bytes; ``_LEFT`` when the client
    disconnected before sending it all."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return _LEFT
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


async def send_error(send: Send, error: HttpError) -> None:
    """Answer ``error`` as JSON (the OpenAI error shape) and close the response."""
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# ---------------------------------------------------------------------- request sizes
def prompt_size(body: dict[str, Any]) -> int:
    """Characters of text plus token ids in a request's prompts (``prompt``, ``messages`` or
    ``text``), counted without tokenising; fields of other shapes count 0 (their own checks
    refuse them)."""
    n = _size(body.get("prompt")) + _size(body.get("text"))
    messages = body.get("messages")
    if isinstance(messages, list):
        n += sum(_size(m.get("content")) for m in messages if isinstance(m, dict))
    return n


def _size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(1 if isinstance(v, int) else _size(v.get("text")) if isinstance(v, dict)
                   else _size(v) for v in value)
    return 0


def check_prompt_size(body: dict[str, Any], limit: int) -> None:
    """400 when the prompts are larger than ``limit`` (before any tokenising)."""
    n = prompt_size(body)
    if n > limit:
        field_name = next((k for k in ("messages", "prompt", "text") if k in body), "prompt")
        raise HttpError(400, f"{field_name}: the prompt has {n} characters (token ids count "
                             f"one each), more than this server's limit of {limit} "
                             "(--max-prompt-chars)", field_name)


# ---------------------------------------------------------------------- SAE names
@dataclass(frozen=True)
class SaeAllowList:
    """Which SAE names a request may give; see the module docstring.

    Attributes:
        served: the names given at start, exactly as given (the demo's aliases count as one).
        patterns: shell-style patterns (``fnmatch``, case-sensitive) of further names; they
            admit names only, never paths (a name starting with ``/``, ``~`` or ``.``, or
            holding ``..`` or a backslash, is a path).
        folders: folders whose sub-folders a request may name by absolute path.
    """

    served: frozenset[str] = frozenset()
    patterns: tuple[str, ...] = ()
    folders: tuple[Path, ...] = ()
    demo: bool = field(default=False)

    @classmethod
    def build(cls, served: Collection[str], patterns: Collection[str] = (),
              folders: Collection[str | Path] = ()) -> SaeAllowList:
        """The list for a server started with ``served`` SAEs and these options; resolves
        the allowed folders once (they must exist)."""

        roots = []
        for f in folders:
            path = Path(f).expanduser()
            if not path.is_dir():
                raise InputError(f"--allow-sae-dir {str(f)!r} is not a folder")
            roots.append(Path(os.path.realpath(path)))
        names = frozenset(str(n).strip() for n in served)
        demo = any(n.lower() in DEMO_ALIASES or is_demo(n) for n in names)
        return cls(names, tuple(p.strip() for p in patterns if p.strip()), tuple(roots), demo)

    def check(self, name: str, param: str) -> None:
        """Raise a 400 (a malformed name) or a 404 (not allowed) for ``name``, read as text."""
        if len(name) > MAX_NAME_CHARS:
            raise HttpError(400, f"{param}: the SAE name has {len(name)} characters; at most "
                                 f"{MAX_NAME_CHARS} are allowed", param)
        if any(ord(c) < 32 or c == "\x7f" for c in name):
            raise HttpError(400, f"{param}: the SAE name holds a control character", param)
        if not self.allows(name.strip()):
            raise not_served(name, param)

    def allows(self, name: str) -> bool:

        if name in self.served or (self.demo and name.lower() in DEMO_ALIASES):
            return True
        if _is_path(name):
            return self._in_folders(name)
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def _in_folders(self, name: str) -> bool:
        if not self.folders or not name.startswith("/") or ".." in Path(name).parts:
            return False
        path = Path(os.path.normpath(name))
        inside = [r for r in self.folders if path != r and path.is_relative_to(r)]
        # only now the file system, inside an allowed folder: no symlink may lead out of it
        return any(Path(os.path.realpath(path)).is_relative_to(r) for r in inside)


def _is_path(name: str) -> bool:
    return name.startswith(("/", "~", ".")) or ".." in name or "\\" in name


def not_served(name: str, param: str) -> HttpError:
    """The one answer for every SAE a request may not use, existing or not."""
    shown = name if len(name) <= 80 else name[:80] + "..."
    return HttpError(404, f"{param}: SAE {shown!r} is not served here (this server serves "
                          "the SAEs its operator named with --sae, --allow-sae or "
                          "--allow-sae-dir)", param)
