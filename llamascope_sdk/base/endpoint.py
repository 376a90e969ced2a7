"""A client for any OpenAI-compatible chat-completions endpoint (a hosted API or a local server).

Standard library only (``urllib`` plus a thread pool), on purpose: the client sends one small
JSON POST at a time and waits for the answer, which ``urllib`` does well, and the core install
stays as light as it is (httpx would be one more dependency, or an extra that every user of
``llamascope explain`` would have to know about). Concurrency is a thread pool of at most
``concurrency`` workers plus a semaphore, so no more than ``concurrency`` requests are ever in
flight, however many threads call :meth:`ChatClient.chat`.

What it does for the caller:

- retries HTTP 429 and 5xx, connection errors and timeouts with exponential backoff
  (``backoff * 2**attempt``, at most ``max_backoff`` seconds), waiting what a ``Retry-After``
  header asks instead when the server sends one; any other HTTP error (400, 401, 404...) stops
  at once with one line that quotes the server;
- counts what the server reports in ``usage`` (prompt and completion tokens), the requests sent,
  the retries, and the replies it could not parse: a body that is not the JSON of a chat
  completion, or (with ``parse=``) a message the caller's parser rejects. Such a reply gives
  ``Reply.value = None`` and is counted, never guessed;
- stops before a request once ``token_budget`` tokens (prompt + completion) were reported
  (requests already in flight still finish, so a run can pass the budget by those).

Example:
    >>> client = ChatClient("http://127.0.0.1:8000/v1", "smollm2", concurrency=4)
    >>> replies = client.map([[{"role": "user", "content": "Say hi"}]] * 3, max_tokens=8)
    >>> client.usage.prompt_tokens, client.usage.unparsable
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from llamascope_sdk.base.errors import InputError, LlamascopeError

Messages = Sequence[dict[str, str]]


class EndpointError(LlamascopeError, ConnectionError):
    """A chat endpoint that refused a request, or kept failing after every retry."""


class TokenBudgetExceeded(EndpointError):
    """The run reached its ``token_budget`` (``--max-cost-tokens``) before this request."""


@dataclass
class Usage:
    """What a :class:`ChatClient` sent and what the server reported, summed over its life."""

    requests: int = 0           #: HTTP requests sent, retries included
    replies: int = 0            #: replies with HTTP 200
    retries: int = 0            #: requests sent again after a 429, a 5xx, a timeout or a dropped connection
    prompt_tokens: int = 0      #: sum of usage.prompt_tokens the server reported
    completion_tokens: int = 0  #: sum of usage.completion_tokens the server reported
    missing_usage: int = 0      #: HTTP 200 replies that reported no usage
    unparsable: int = 0         #: replies that were no chat completion, or that ``parse`` rejected

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class Reply:
    """One answer. ``text`` is None when the body was not a chat completion; ``value`` is
    ``parse(text)``, or None when there was no text or the parser raised ValueError."""

    text: str | None
    value: Any
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


def chat_url(url: str) -> str:
    """``http://host:port/v1`` (what OpenAI clients call the base URL) or the full
    ``.../chat/completions`` URL -> the full URL. Anything but http(s) is refused."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InputError(f"--endpoint {url!r} is not an http(s) URL; give the base URL of an "
                         "OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 or "
                         "https://api.openai.com/v1")
    base = url.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header (seconds, or an HTTP date) -> seconds to wait, or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ChatClient:
    """Sends chat completions to one model at one OpenAI-compatible endpoint.

    Args:
        url: the base URL (``http://127.0.0.1:8000/v1``) or the full chat-completions URL.
        model: the ``model`` field of every request.
        api_key: sent as ``Authorization: Bearer ...`` when given.
        concurrency: at most this many requests in flight at once.
        timeout: seconds the server may stay silent before a request counts as timed out.
        max_retries: retries of one request (429, 5xx, timeouts, dropped connections).
        backoff, max_backoff: the wait before retry ``k`` is ``min(max_backoff, backoff * 2**k)``
            seconds, unless the server sends ``Retry-After`` (then that, also capped).
        temperature: sent with every request (0 by default: the most reproducible).
        seed: sent with every request when given (servers that support it sample reproducibly).
        token_budget: refuse to send once this many tokens (prompt + completion) were reported.
    """

    def __init__(self, url: str, model: str, *, api_key: str | None = None,
                 concurrency: int = 4, timeout: float = 120.0, max_retries: int = 6,
                 backoff: float = 1.0, max_backoff: float = 60.0, temperature: float = 0.0,
                 seed: int | None = None, token_budget: int | None = None) -> None:
        if concurrency < 1:
            raise InputError(f"concurrency must be at least 1, got {concurrency}")
        if timeout <= 0 or max_retries < 0 or backoff < 0:
            raise InputError(f"timeout must be > 0 and max_retries, backoff >= 0; got "
                             f"{timeout}, {max_retries}, {backoff}")
        if not model:
            raise InputError("the model name is empty; pass the model the endpoint serves")
        self.url = chat_url(url)
        self.model = model
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.temperature = float(temperature)
        self.seed = seed
        self.token_budget = token_budget
        self.usage = Usage()
        self._api_key = api_key
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.concurrency)
        host = urllib.parse.urlparse(self.url).hostname or ""
        # A local server is reached directly even when http_proxy is set for the internet.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(host) else []
        self._opener = urllib.request.build_opener(*handlers)

    # ------------------------------------------------------------------ one request
    def chat(self, messages: Messages, *, max_tokens: int | None = None,
             parse: Callable[[str], Any] | None = None) -> Reply:
        """Send one conversation and return the answer (retrying as the class says).

        Raises:
            EndpointError: an HTTP error other than 429/5xx, or every retry failed.
            TokenBudgetExceeded: the token budget was reached before this request.
        """
        payload: dict[str, Any] = {"model": self.model, "messages": list(messages),
                                   "temperature": self.temperature}
        if max_tokens is not None:
            payload["max_tokens"] = int(max_tokens)
        if self.seed is not None:
            payload["seed"] = int(self.seed)
        body = self._send(json.dumps(payload).encode("utf-8"))
        return self._reply(body, parse)

    def map(self, conversations: Iterable[Messages], *, max_tokens: int | None = None,
            parse: Callable[[str], Any] | Sequence[Callable[[str], Any]] | None = None
            ) -> list[Reply]:
        """:meth:`chat` for each conversation, ``concurrency`` at a time; replies in order.
        ``parse``: one parser for all, or a list with one per conversation."""
        jobs = list(conversations)
        parsers = list(parse) if isinstance(parse, Sequence) else [parse] * len(jobs)
        if len(parsers) != len(jobs):
            raise InputError(f"{len(parsers)} parsers for {len(jobs)} conversations")

        def one(k: int) -> Reply:
            return self.chat(jobs[k], max_tokens=max_tokens, parse=parsers[k])

        if len(jobs) <= 1:
            return [one(k) for k in range(len(jobs))]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs))) as pool:
            return list(pool.map(one, range(len(jobs))))

    # ------------------------------------------------------------------ internals
    def _wait(self, attempt: int, retry_after: float | None) -> float:
        wait = retry_after if retry_after is not None else self.backoff * 2 ** attempt
        return min(self.max_backoff, wait)

    def _send(self, data: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            with self._lock:
                if self.token_budget is not None and self.usage.total_tokens >= self.token_budget:
                    raise TokenBudgetExceeded(
                        f"stopped: {self.usage.total_tokens} tokens were used, the budget is "
                        f"{self.token_budget}", hint="raise --max-cost-tokens, then run again "
                        "(what is done is kept)")
                self.usage.requests += 1
                if attempt:
                    self.usage.retries += 1
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            retry_after: float | None = None
            try:
                with self._slots, self._opener.open(req, timeout=self.timeout) as resp:
                    return bytes(resp.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace").strip()
                if exc.code != 429 and not 500 <= exc.code < 600:
                    raise EndpointError(f"{self.url} answered HTTP {exc.code}: {detail or exc.reason}",
                                        hint=_hint(exc.code)) from None
                last = f"HTTP {exc.code}: {detail or exc.reason}"
                retry_after = retry_after_seconds(exc.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
            if attempt < self.max_retries:
                time.sleep(self._wait(attempt, retry_after))
        raise EndpointError(f"{self.url}: no answer after {self.max_retries + 1} attempts "
                            f"(last: {last})", hint="is the server running and the URL right? "
                            "Rerun to resume: finished work is kept")

    def _reply(self, body: bytes, parse: Callable[[str], Any] | None) -> Reply:
        prompt = completion = 0
        text: str | None = None
        finish: str | None = None
        reported = False
        try:
            obj = json.loads(body)
            usage = obj.get("usage") if isinstance(obj, dict) else None
            if isinstance(usage, dict):
                reported = True
                prompt = int(usage.get("prompt_tokens") or 0)
                completion = int(usage.get("completion_tokens") or 0)
            choice = obj["choices"][0]
            content = choice["message"]["content"]
            finish = choice.get("finish_reason")
            text = content if isinstance(content, str) else None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            text = None
        value = None
        parsed = text is not None
        if text is not None and parse is not None:
            try:
                value = parse(text)
            except ValueError:
                parsed = False
        elif text is not None:
            value = text
        with self._lock:
            self.usage.replies += 1
            self.usage.prompt_tokens += prompt
            self.usage.completion_tokens += completion
            if not reported:
                self.usage.missing_usage += 1
            if not parsed:
                self.usage.unparsable += 1
        return Reply(text, value, prompt, completion, finish)


def _hint(code: int) -> str | None:
    return {401: "check the API key (--api-key-env names the variable that holds it)",
            403: "the key may not use this model",
            404: "check the URL (the base URL usually ends in /v1) and the model name"}.get(code)


__all__ = ["ChatClient", "EndpointError", "Reply", "TokenBudgetExceeded", "Usage", "chat_url",
           "retry_after_seconds"]
