"""The HTTP application: OpenAI-style endpoints over the scheduler, the pool and the model.

``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(both also streamed as server-sent events with ``stream: true``; answers shaped in
:mod:`.choices`), ``POST /v1/encode``, and the tokenizer (``GET /tokenizer_info``,
``POST /tokenize``, ``POST /detokenize``, :mod:`.tokenize`). ``presets`` (named steering lists)
are served as models of their own, ``MODEL:NAME``: a client that cannot add a ``steering`` field
(lm-eval's loglikelihood requests) steers by naming one.
With an API key every endpoint but ``/health`` needs ``Authorization: Bearer KEY`` (compared in
constant time). Errors are one line in the OpenAI error shape (see :mod:`.errors`).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from llamascope_sdk.loading.models import context_window, special_ids
from llamascope_sdk.serve import choices
from llamascope_sdk.serve import tokenize as tokenizer_api
from llamascope_sdk.serve.encoding import encode_request
from llamascope_sdk.serve.errors import HttpError, http_error
from llamascope_sdk.serve.payloads import (
    GenRequest,
    Limits,
    parse_generation,
    parse_json,
    parse_steering_list,
)
from llamascope_sdk.serve.scheduler import Job, Scheduler
from llamascope_sdk.serve.steering import ReadoutLog, Steering, build, check_name
from llamascope_sdk.steering.batch_generation import Row, Token
from llamascope_sdk.steering.pool import SaePool
from llamascope_sdk.steering.readout import Readout
from llamascope_sdk.store.feature_store import load_store
from llamascope_sdk.store.percentile import percentiles


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
    stores: tuple[str, ...] = ()  #: feature stores (folders or SAE names) for readout percentiles
    #: steering lists served as models named ``{model_id}:{name}`` (see the module docstring)
    presets: dict[str, list[Any]] = field(default_factory=dict)

    def model_ids(self) -> list[str]:
        return [self.model_id, *(f"{self.model_id}:{p}" for p in self.presets)]


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
        self.stores = [load_store(s) for s in config.stores]
        self._store_of: dict[str, Any] = {}  # readout SAE name -> its store, or None
        self.special = frozenset(special_ids(tokenizer))
        self.max_model_len = context_window(model)

    # ------------------------------------------------------------------ generation
    async def prepare(self, body: dict[str, Any], chat: bool) -> tuple[GenRequest, Steering]:
        req = parse_generation(body, chat=chat, tokenizer=self.tokenizer, model=self.model,
                               limits=self.config.limits)
        self._preset(req)
        rows = req.n_choices + req.return_baseline
        if rows > self.config.max_batch:
            param = "n" if req.n > 1 else "prompt"
            raise HttpError(400, f"{param}: the request needs {rows} rows (prompts x n), more "
                                 f"than this server's batch of {self.config.max_batch}; send "
                                 "fewer prompts per request", param)
        from starlette.concurrency import run_in_threadpool

        steering = await run_in_threadpool(
            build, req.edits, self.pool, self.model, served=self.config.served_saes,
            allow_local=self.config.allow_local_saes, readouts=req.readouts)
        return req, steering

    def readout_log(self, steering: Steering) -> ReadoutLog:
        """The log of ``steering``'s readouts, with percentiles where a store has the SAE."""
        def percentile_fn(r: Readout) -> Any:
            if r.name not in self._store_of:
                fits = [st for st in self.stores if _store_fits(st, r.sae)]
                self._store_of[r.name] = fits[0] if fits else None
            store = self._store_of[r.name]
            if store is None:
                return None
            edges = torch.tensor(store.meta["histogram_edges"])
            return lambda f, v: percentiles(store.hist, edges, f, v)

        return ReadoutLog(steering.readouts, self.decode,
                          [percentile_fn(r) for r in steering.readouts])

    def _preset(self, req: GenRequest) -> None:
        """Check ``model``; a preset's name brings its steering list."""
        if req.model in (None, self.config.model_id):
            return
        name = req.model.removeprefix(f"{self.config.model_id}:")
        if name == req.model or name not in self.config.presets:
            raise HttpError(404, f"model {req.model!r} is not served; this server serves "
                                 f"{', '.join(map(repr, self.config.model_ids()))}", "model")
        if req.edits:
            raise HttpError(400, f"model {req.model!r} brings its own steering; send steering "
                                 f"to {self.config.model_id!r} or drop the field", "steering")
        req.edits = parse_steering_list(self.config.presets[name], chat=req.chat,
                                        limits=self.config.limits)

    def job(self, req: GenRequest, steering: Steering) -> Job:
        """The request's rows (choice i: prompt i // n, sample i % n; then the baseline, which
        has no edits and reads nothing)."""
        def row(i: int, edits: list[Any], readouts: list[Readout]) -> Row:
            seed = None if req.seed is None else req.seed + i % req.n
            return Row(req.prompts[i // req.n], edits, req.max_tokens, req.temperature,
                       req.top_p, seed, readouts=readouts, logprobs=req.logprobs,
                       prompt_logprobs=req.echo and req.logprobs is not None)

        rows = [row(i, steering.edits, steering.readouts) for i in range(req.n_choices)]
        if req.return_baseline:
            rows.append(row(0, [], []))
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

    @functools.lru_cache(maxsize=65536)  # noqa: B019  (one Server per app, alive as long)
    def piece(self, token: int) -> str:
        """One token's own string (special tokens spelled out), for log-probabilities."""
        return str(self.tokenizer.decode([token], skip_special_tokens=False))


def _store_fits(store: Any, sae: Any) -> bool:
    """Whether ``store`` was mined with ``sae`` (its weights' fingerprint)."""
    try:
        store.check_sae(sae)
    except ValueError:  # StoreMismatchError
        return False
    return True


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
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                            "owned_by": "llamascope-sdk"}
                                           for m in config.model_ids()]}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return tokenizer_api.tokenizer_info(tokenizer, config.model_id, server.max_model_len)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        return tokenizer_api.tokenize(tokenizer, parse_json(await request.body()),
                                      server.max_model_len)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        return tokenizer_api.detokenize(tokenizer, parse_json(await request.body()))

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

            return _Stream(choices.stream(server, req, job, steering, request), cleanup)
        try:
            rows = await choices.collect(server, req, job, steering, request)
        finally:
            steering.release()
        return choices.body(server, req, steering, rows)

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


__all__ = ["ServeConfig", "Server", "create_app", "check_name"]
