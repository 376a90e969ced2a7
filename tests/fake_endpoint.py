"""A scripted, token-counting fake of an OpenAI-compatible chat-completions endpoint.

It listens on 127.0.0.1 on a free port, answers from its own threads, and stops by itself
after ``lifetime`` seconds (or when its ``with`` block ends)::

    with FakeEndpoint(reply=lambda messages: "an explanation") as fake:
        client = ChatClient(fake.url, "fake-model")
        ...
    fake.usage          # {"prompt_tokens": ..., "completion_tokens": ...} it reported
    fake.requests       # every request body it received (parsed JSON), in arrival order

Answers come first from ``script`` (consumed in order, shared by all threads), then from
``reply``. A script entry (or what ``reply`` returns) is one of:

- a ``str``: a normal chat completion with that message;
- ``Status(code, retry_after=None)``: an HTTP error (429, 500, 503, 400, ...);
- ``Delay(seconds, then)``: wait, then answer ``then`` (a timeout test);
- ``Malformed(body)``: HTTP 200 whose body is not a chat completion (``body`` bytes);
- ``Drop()``: close the connection without answering.

Tokens are counted like OpenAI's documented rule for chat models, with a word-and-punctuation
count standing in for a BPE tokenizer (pass ``count_tokens`` to change it): each message costs
its content's tokens + ``per_message`` (role and separators), each request ``per_request``
more (the reply's priming); a completion costs its text's tokens.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_WORDS = re.compile(r"\w+|[^\w\s]")


def count_words(text: str) -> int:
    """The fake's token count: words and punctuation marks."""
    return len(_WORDS.findall(text))


@dataclass(frozen=True)
class Status:
    code: int
    retry_after: str | None = None
    body: str = '{"error": {"message": "scripted error"}}'


@dataclass(frozen=True)
class Delay:
    seconds: float
    then: Any = "ok"


@dataclass(frozen=True)
class Malformed:
    body: bytes = b'{"choices": [ {"message": '


@dataclass(frozen=True)
class Drop:
    pass


Action = str | Status | Delay | Malformed | Drop


@dataclass
class FakeEndpoint:
    reply: Callable[[list[dict[str, str]]], Action] = lambda messages: "ok"
    script: list[Action] = field(default_factory=list)
    lifetime: float = 60.0
    count_tokens: Callable[[str], int] = count_words
    per_message: int = 4
    per_request: int = 3
    model_name: str | None = None  # when set, other model names get HTTP 404
    #: when set, a request's prompt tokens are this of its messages (a server applying its
    #: model's chat template), instead of the per-message rule
    count_messages: Callable[[list[dict[str, str]]], int] | None = None

    def __post_init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.statuses: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._script = list(self.script)
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------ life
    def start(self) -> FakeEndpoint:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                fake._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._timer is not None:
            self._timer.cancel()

    def __enter__(self) -> FakeEndpoint:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the fake first"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ------------------------------------------------------------------ answering
    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        if self.count_messages is not None:
            return self.count_messages(messages)
        return sum(self.count_tokens(m.get("content", "")) + self.per_message
                   for m in messages) + self.per_request

    def _next(self, messages: list[dict[str, str]]) -> Action:
        with self._lock:
            if self._script:
                return self._script.pop(0)
        return self.reply(messages)

    def _leave(self, h: BaseHTTPRequestHandler) -> None:
        """The request stops counting as in flight, once: before its answer is written (a
        client may send its next request as soon as it has read the answer)."""
        if getattr(h, "fake_in_flight", False):
            h.fake_in_flight = False  # type: ignore[attr-defined]
            with self._lock:
                self.in_flight -= 1

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        h.fake_in_flight = True  # type: ignore[attr-defined]
        try:
            n = int(h.headers.get("Content-Length") or 0)
            request = json.loads(h.rfile.read(n))
            with self._lock:
                self.requests.append(request)
            if self.model_name is not None and request.get("model") != self.model_name:
                self._send(h, 404, b'{"error": {"message": "model not found"}}')
                return
            messages = request["messages"]
            action = self._next(messages)
            while isinstance(action, Delay):
                time.sleep(action.seconds)
                action = action.then
            self._answer(h, request, messages, action)
        finally:
            self._leave(h)

    def _answer(self, h: BaseHTTPRequestHandler, request: dict[str, Any],
                messages: list[dict[str, str]], action: Action) -> None:
        if isinstance(action, Drop):
            self._leave(h)
            h.close_connection = True
            h.connection.close()
            with self._lock:
                self.statuses.append(0)
            return
        if isinstance(action, Status):
            headers = {"Retry-After": action.retry_after} if action.retry_after else {}
            self._send(h, action.code, action.body.encode(), headers)
            return
        if isinstance(action, Malformed):
            self._send(h, 200, action.body)
            return
        text = str(action)
        completion = self.count_tokens(text)
        if request.get("max_tokens") is not None and completion > int(request["max_tokens"]):
            words = _WORDS.findall(text)[: int(request["max_tokens"])]
            text, completion = " ".join(words), len(words)
        prompt = self.prompt_tokens(messages)
        with self._lock:
            self.usage["prompt_tokens"] += prompt
            self.usage["completion_tokens"] += completion
        body = {"id": "chatcmpl-fake", "object": "chat.completion", "model": request.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}
        self._send(h, 200, json.dumps(body).encode())

    def _send(self, h: BaseHTTPRequestHandler, code: int, body: bytes,
              headers: dict[str, str] | None = None) -> None:
        with self._lock:
            self.statuses.append(code)
        self._leave(h)
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        try:
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # a client that stopped reading (a cap)
            h.close_connection = True
