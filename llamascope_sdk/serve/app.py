"""The HTTP application: OpenAI-style endpoints over the scheduler, the pool and the model.

``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(both also streamed as server-sent events with ``stream: true``) and ``POST /v1/encode``.
Every request passes :class:`~.security.Guard` first (Host, Origin, API key, JSON only, body
size); a body is then parsed, its prompts measured (no tokenising yet) and, on a worker thread,
tokenised and its steering built, so the event loop only routes. Errors are one line in the
OpenAI error shape (see :mod:`.errors`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from llamascope_sdk.base.errors import InputError
from llamascope_sdk.serve.decoding import ReplyText
from llamascope_sdk.serve.encoding import encode_request
from llamascope_sdk.serve.errors import (
    HttpError,
    QueueFullError,
    ShuttingDownError,
    http_error,
    internal,
)
from llamascope_sdk.serve.payloads import GenRequest, Limits, parse_generation, parse_json
from llamascope_sdk.serve.scheduler import Job, Scheduler
from llamascope_sdk.serve.security import (
    MAX_BODY,
    MAX_PROMPT_CHARS,
    Guard,
    GuardPolicy,
    SaeAllowList,
    check_api_key,
    check_prompt_size,
)
from llamascope_sdk.serve.steering import Steering, build
from llamascope_sdk.steering.batch_generation import Row, Token
from llamascope_sdk.steering.pool import SaePool


@dataclass
class ServeConfig:
    """What the server serves and its limits; checked when made (:class:`InputError`).

    Attributes:
        served_saes: SAE names and folders given at start: requests may use these.
        allow_saes: shell-style patterns of further SAE names requests may use (loaded, and
            downloaded, on first use): ``"L*R-8x"``, ``"demo"``, ``"myorg/*"``.
        allow_sae_dirs: folders whose sub-folders requests may name by absolute path.
        allowed_hosts: ``Host`` names accepted besides the loopback ones.
        max_body: largest request body in bytes (1 MiB).
        max_prompt_chars: largest prompt of a request, characters plus token ids (100,000).
    """

    model_id: str
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    served_saes: tuple[str, ...] = ()
    allow_saes: tuple[str, ...] = ()
    allow_sae_dirs: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_batch: int = 16
    max_queue: int = 64
    max_body: int = MAX_BODY
    max_prompt_chars: int = MAX_PROMPT_CHARS

    def __post_init__(self) -> None:
        check_api_key(self.api_key)
        for name, value, low in (("max_queue", self.max_queue, 1), ("max_batch", self.max_batch, 2),
                                 ("max_body", self.max_body, 1),
                                 ("max_prompt_chars", self.max_prompt_chars, 1)):
            if value < low:
                raise InputError(f"{name} must be at least {low}, got {value}")


_GONE = object()  # put on a job's events when its client disconnects


async def _watch_disconnect(job: Job, request: Any) -> None:
    """Wait for the client to go away (the request body is already read, so the next message
    is the disconnect), then wake the request's reader."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.events.put_nowait(_GONE)


class _Stream(StreamingResponse):
    """A streamed response that runs ``cleanup`` however it ends, even when the client left
    before the body started (then the body generator never runs, nor its ``finally``)."""

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


class Server:
    """The model, tokenizer, pool and scheduler behind the endpoints."""

    def __init__(self, model: Any, tokenizer: Any, pool: SaePool, config: ServeConfig) -> None:
        self.model, self.tokenizer, self.pool, self.config = model, tokenizer, pool, config
        self.names = SaeAllowList.build(config.served_saes, config.allow_saes,
                                        config.allow_sae_dirs)
        self.scheduler = Scheduler(model, tokenizer, max_batch=config.max_batch,
                                   max_queue=config.max_queue)

    # ------------------------------------------------------------------ generation
    async def body(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, its prompts within ``max_prompt_chars`` (parsed on a
        worker thread: a body of up to ``max_body`` bytes is no work for the event loop)."""
        raw = await request.body()

        def parse() -> dict[str, Any]:
            body = parse_json(raw)
            check_prompt_size(body, self.config.max_prompt_chars)
            return body

        return await run_in_threadpool(parse)

    async def prepare(self, body: dict[str, Any], chat: bool) -> tuple[GenRequest, Steering]:
        """The checked request (tokenised) and its steering, built on a worker thread."""
        return await run_in_threadpool(self._prepare, body, chat)

    def _prepare(self, body: dict[str, Any], chat: bool) -> tuple[GenRequest, Steering]:
        req = parse_generation(body, chat=chat, tokenizer=self.tokenizer, model=self.model,
                               limits=self.config.limits)
        if req.model not in (None, self.config.model_id):
            raise HttpError(404, f"model {req.model!r} is not served; this server serves "
                                 f"{self.config.model_id!r}", "model")
        for spec in req.edits:
            if len(spec.features) > self.config.limits.max_edits:
                raise HttpError(400, f"{spec.param}.feature: {len(spec.features)} features in "
                                     "one edit, more than this server's limit of "
                                     f"{self.config.limits.max_edits} (--max-edits)",
                                f"{spec.param}.feature")
        return req, build(req.edits, self.pool, self.model, names=self.names)

    def job(self, req: GenRequest, steering: Steering) -> Job:
        def row(edits: list[Any]) -> Row:
            return Row(req.ids, edits, req.max_tokens, req.temperature, req.top_p, req.seed)

        rows = [row(steering.edits)] + ([row([])] if req.return_baseline else [])
        job = Job(rows, asyncio.get_running_loop())
        try:
            self.scheduler.submit(job)
        except (QueueFullError, ShuttingDownError) as exc:
            raise http_error(exc) from None
        return job

    async def tokens(self, job: Job, request: Any, *, watch: bool = False) -> AsyncIterator[Token]:
        """The job's tokens as they come; cancels the job when the client goes away.

        ``watch`` (non-streamed requests): a task waits for the client's disconnect the whole
        time, so a client that gives up frees its rows at once. A streamed response is cancelled
        by Starlette when its client leaves (that ends this generator); it is also polled here
        while no token comes."""
        done = False
        watcher = asyncio.ensure_future(_watch_disconnect(job, request)) if watch else None
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if not watch and await request.is_disconnected():
                        return
                    continue
                if item is _GONE:
                    return
                if item is None:
                    done = True
                    return
                if isinstance(item, BaseException):
                    done = True
                    raise http_error(item)
                yield item
        finally:
            if watcher is not None:
                watcher.cancel()
            if not done:
                self.scheduler.cancel(job)



def create_app(model: Any, tokenizer: Any, pool: SaePool, config: ServeConfig) -> Any:
    """The FastAPI application (needs the ``serve`` extra: fastapi, uvicorn), behind the
    :class:`~.security.Guard`."""
    server = Server(model, tokenizer, pool, config)
    app = FastAPI(title="llamascope serve", lifespan=_lifespan(server), docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.server = server
    _error_handlers(app)
    _info_routes(app, server)
    _generation_routes(app, server)
    app.add_middleware(Guard, policy=GuardPolicy(config.api_key, config.allowed_hosts,
                                                 config.max_body))
    return app


def _lifespan(server: Server) -> Callable[[Any], Any]:
    """On shutdown the scheduler finishes what it runs (off the event loop)."""
    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.scheduler.stop)

    return lifespan


def _error_handlers(app: FastAPI) -> None:
    """Our errors as their JSON answer; anything unexpected as a 500 naming no host detail."""
    @app.exception_handler(HttpError)
    async def _http_error(_request: Request, exc: HttpError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        err = internal(exc)
        return JSONResponse(err.body(), status_code=err.status)


def _info_routes(app: FastAPI, server: Server) -> None:
    config, pool = server.config, server.pool

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_id, **server.scheduler.load,
                "saes_loaded": len(pool.loaded()), "sae_memory_used": pool.used,
                "sae_memory_budget": pool.budget}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_id, "object": "model",
                                            "created": 0, "owned_by": "llamascope-sdk"}]}


def _generation_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(server, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(server, request, chat=False)

    @app.post("/v1/encode")
    async def encode(request: Request) -> Any:
        return await encode_request(server, await server.body(request))


async def generate(server: Server, request: Request, chat: bool) -> Any:
    """A chat or completion request, answered whole or streamed."""
    req, steering = await server.prepare(await server.body(request), chat)
    try:
        job = server.job(req, steering)
    except BaseException:
        steering.release()
        raise
    if req.stream:
        def cleanup() -> None:
            steering.release()
            server.scheduler.cancel(job)  # a no-op once the job finished

        return _Stream(_stream(server, job, steering, request, chat, req.stop), cleanup)
    try:
        texts, finish = await _collect(server, req, job, request)
    finally:
        steering.release()
    return _response(server, req, steering, texts, finish, chat)


async def _collect(server: Server, req: GenRequest, job: Job,
                   request: Any) -> tuple[list[ReplyText], list[str]]:
    """Each row's text (decoded as its tokens come) and finish reason. A row that meets a
    stop string is done; when all are, leaving ``server.tokens`` cancels the job."""
    texts = [ReplyText(server.tokenizer, req.stop) for _ in job.rows]
    finish = ["length"] * len(job.rows)
    done = [False] * len(job.rows)
    async for t in server.tokens(job, request, watch=True):
        if done[t.row]:
            continue  # this row met a stop string; the others still run
        texts[t.row].add(t.token, final=t.finish is not None)
        if t.finish:
            finish[t.row], done[t.row] = t.finish, True
        if texts[t.row].stop_at is not None:
            finish[t.row], done[t.row] = "stop", True
        if all(done):
            break
    return texts, finish


def _response(server: Server, req: GenRequest, steering: Steering, texts: list[ReplyText],
              finish: list[str], chat: bool) -> dict[str, Any]:
    text = texts[0].reply
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": finish[0], "logprobs": None} if chat else
                              {"index": 0, "text": text, "finish_reason": finish[0], "logprobs": None})
    used = len(texts[0].ids)
    out: dict[str, Any] = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": server.config.model_id, "choices": [choice],
        "usage": {"prompt_tokens": len(req.ids), "completion_tokens": used,
                  "total_tokens": len(req.ids) + used},
        "steering": {"applied": steering.applied},
    }
    if req.return_baseline:
        out["steering"]["baseline"] = {"text": texts[1].reply, "finish_reason": finish[1],
                                       "completion_tokens": len(texts[1].ids)}
    return out


async def _stream(server: Server, job: Job, steering: Steering, request: Any, chat: bool,
                  stops: list[str]) -> AsyncIterator[str]:
    """Server-sent events: the text in pieces that concatenate to the non-streamed text (with
    ``stops``, the last few characters wait until no stop string can be forming there)."""
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(piece: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {} if piece is None else {"content": piece}
            if first:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish,
                                      "logprobs": None}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
        body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else
                                "text_completion", "created": created,
                                "model": server.config.model_id, "choices": [choice]}
        if first:
            body["steering"] = {"applied": steering.applied}
        return f"data: {json.dumps(body)}\n\n"

    reply = ReplyText(server.tokenizer, stops)
    sent = 0  # characters of reply.text sent so far
    hold = max((len(x) for x in stops), default=1) - 1  # a stop string may still be forming
    try:
        yield chunk("" if chat else None, None, first=True)
        async for t in server.tokens(job, request):
            reply.add(t.token, final=t.finish is not None)
            if reply.stop_at is not None:
                yield chunk(reply.text[sent:reply.stop_at], "stop")
                break  # leaving server.tokens cancels the job
            end = len(reply.text) if t.finish else max(sent, len(reply.text) - hold)
            piece, sent = reply.text[sent:end], end
            if piece or t.finish:
                yield chunk(piece, t.finish)
        yield "data: [DONE]\n\n"
    except HttpError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        steering.release()


__all__ = ["ServeConfig", "Server", "create_app"]
