"""The HTTP application: OpenAI-style endpoints over the scheduler, the pool and the model.

``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(both also streamed as server-sent events with ``stream: true``) and ``POST /v1/encode``.
With an API key every endpoint but ``/health`` needs ``Authorization: Bearer KEY`` (compared in
constant time). Errors are one line in the OpenAI error shape (see :mod:`.errors`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from llamascope_sdk.serve.encoding import encode_request
from llamascope_sdk.serve.errors import HttpError, http_error
from llamascope_sdk.serve.payloads import (
    GenRequest,
    Limits,
    first_stop,
    parse_generation,
    parse_json,
)
from llamascope_sdk.serve.scheduler import Job, Scheduler
from llamascope_sdk.serve.steering import Steering, build, check_name
from llamascope_sdk.steering.batch_generation import Row, Token
from llamascope_sdk.steering.pool import SaePool


@dataclass
class ServeConfig:
    """What the server serves and its limits."""

    model_id: str
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    served_saes: tuple[str, ...] = ()
    allow_local_saes: bool = False
    max_batch: int = 16
    max_queue: int = 64


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
        self.scheduler = Scheduler(model, tokenizer, max_batch=config.max_batch,
                                   max_queue=config.max_queue)

    # ------------------------------------------------------------------ generation
    async def prepare(self, body: dict[str, Any], chat: bool) -> tuple[GenRequest, Steering]:
        req = parse_generation(body, chat=chat, tokenizer=self.tokenizer, model=self.model,
                               limits=self.config.limits)
        if req.model not in (None, self.config.model_id):
            raise HttpError(404, f"model {req.model!r} is not served; this server serves "
                                 f"{self.config.model_id!r}", "model")
        from starlette.concurrency import run_in_threadpool

        steering = await run_in_threadpool(
            build, req.edits, self.pool, self.model, served=self.config.served_saes,
            allow_local=self.config.allow_local_saes)
        return req, steering

    def job(self, req: GenRequest, steering: Steering) -> Job:
        def row(edits: list[Any]) -> Row:
            return Row(req.ids, edits, req.max_tokens, req.temperature, req.top_p, req.seed)

        rows = [row(steering.edits)] + ([row([])] if req.return_baseline else [])
        job = Job(rows, asyncio.get_running_loop())
        self.scheduler.submit(job)
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

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def _check_key(server: Server, request: Any) -> None:
    key = server.config.api_key
    if key is None:
        return
    got = request.headers.get("authorization", "")
    want = f"Bearer {key}"
    if not hmac.compare_digest(got.encode(), want.encode()):
        raise HttpError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")


def create_app(model: Any, tokenizer: Any, pool: SaePool, config: ServeConfig) -> Any:
    """The FastAPI application (needs the ``serve`` extra: fastapi, uvicorn)."""
    server = Server(model, tokenizer, pool, config)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.scheduler.stop)

    app = FastAPI(title="llamascope serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server

    @app.exception_handler(HttpError)
    async def _http_error(_request: Request, exc: HttpError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if request.url.path != "/health":
            try:
                _check_key(server, request)
            except HttpError as exc:
                return JSONResponse(exc.body(), status_code=exc.status,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_id, **server.scheduler.load,
                "saes_loaded": len(pool.loaded()), "sae_memory_used": pool.used,
                "sae_memory_budget": pool.budget}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_id, "object": "model",
                                            "created": 0, "owned_by": "llamascope-sdk"}]}

    async def generate(request: Request, chat: bool) -> Any:
        body = parse_json(await request.body())
        req, steering = await server.prepare(body, chat)
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
            ids: list[list[int]] = [[] for _ in job.rows]
            finish: list[str] = ["length"] * len(job.rows)
            cut: list[int | None] = [None] * len(job.rows)
            done = [False] * len(job.rows)
            async for t in server.tokens(job, request, watch=True):
                if done[t.row]:
                    continue  # this row met a stop string; the others still run
                ids[t.row].append(t.token)
                if t.finish:
                    finish[t.row], done[t.row] = t.finish, True
                if req.stop:
                    at = first_stop(server.decode(ids[t.row]), req.stop)
                    if at is not None:
                        cut[t.row], finish[t.row], done[t.row] = at, "stop", True
                if all(done):
                    break  # leaving server.tokens cancels the job: its rows are freed
        finally:
            steering.release()
        return _response(server, req, steering, ids, finish, chat, cut)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    @app.post("/v1/encode")
    async def encode(request: Request) -> Any:

        body = parse_json(await request.body())
        return await encode_request(server, body)

    return app


def _response(server: Server, req: GenRequest, steering: Steering, ids: list[list[int]],
              finish: list[str], chat: bool, cut: list[int | None]) -> dict[str, Any]:
    def text_of(row: int) -> str:
        return server.decode(ids[row])[:cut[row]]  # [:None] is the whole text

    text = text_of(0)
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": finish[0], "logprobs": None} if chat else
                              {"index": 0, "text": text, "finish_reason": finish[0], "logprobs": None})
    out: dict[str, Any] = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": server.config.model_id, "choices": [choice],
        "usage": {"prompt_tokens": len(req.ids), "completion_tokens": len(ids[0]),
                  "total_tokens": len(req.ids) + len(ids[0])},
        "steering": {"applied": steering.applied},
    }
    if req.return_baseline:
        out["steering"]["baseline"] = {"text": text_of(1), "finish_reason": finish[1],
                                       "completion_tokens": len(ids[1])}
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

    ids: list[int] = []
    sent = ""
    hold = max((len(x) for x in stops), default=1) - 1  # a stop string may still be forming
    try:
        yield chunk("" if chat else None, None, first=True)
        async for t in server.tokens(job, request):
            ids.append(t.token)
            text = server.decode(ids)
            if t.finish is None and text.endswith("\ufffd"):
                continue  # half of a multi-byte character: wait for the rest
            at = first_stop(text, stops) if stops else None
            if at is not None:
                yield chunk(text[len(sent):at], "stop")
                break  # leaving server.tokens cancels the job
            end = len(text) if t.finish else max(len(sent), len(text) - hold)
            piece, sent = text[len(sent):end], text[:end]
            if piece or t.finish:
                yield chunk(piece, t.finish)
        yield "data: [DONE]\n\n"
    except HttpError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        steering.release()


__all__ = ["ServeConfig", "Server", "create_app", "check_name"]
