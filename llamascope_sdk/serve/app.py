"""The HTTP application: OpenAI-style endpoints over the scheduler, the pool and the model.

``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(both also streamed as server-sent events with ``stream: true``; answers shaped in
:mod:`.choices`), ``POST /v1/encode``, and the tokenizer (``GET /tokenizer_info``,
``POST /tokenize``, ``POST /detokenize``, :mod:`.tokenize`). ``presets`` (named steering lists)
are served as models of their own, ``MODEL:NAME``: a client that cannot add a ``steering`` field
(lm-eval's loglikelihood requests) steers by naming one.
Every request passes :class:`~.security.Guard` first (Host, Origin, API key, JSON only, body
size); a body is then parsed, its prompts measured (no tokenising yet) and, on a worker thread,
tokenised and its steering built, so the event loop only routes. Errors are one line in the
OpenAI error shape (see :mod:`.errors`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

import llamascope_sdk.serve.choices as choices
import llamascope_sdk.serve.tokenize as tokenizer_api
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.loading.models import context_window, special_ids
from llamascope_sdk.serve.encoding import encode_request
from llamascope_sdk.serve.errors import (
    HttpError,
    QueueFullError,
    ShuttingDownError,
    http_error,
    internal,
)
from llamascope_sdk.serve.payloads import (
    GenRequest,
    Limits,
    parse_generation,
    parse_json,
    parse_steering_list,
)
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
from llamascope_sdk.serve.steering import ReadoutLog, Steering, build
from llamascope_sdk.steering.batch_generation import Row, Token
from llamascope_sdk.steering.pool import SaePool
from llamascope_sdk.steering.readout import Readout
from llamascope_sdk.store.feature_store import load_store
from llamascope_sdk.store.percentile import percentiles


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
    stores: tuple[str, ...] = ()  #: feature stores (folders or SAE names) for readout percentiles
    #: steering lists served as models named ``{model_id}:{name}`` (see the module docstring)
    presets: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_api_key(self.api_key)
        for name, value, low in (("max_queue", self.max_queue, 1), ("max_batch", self.max_batch, 2),
                                 ("max_body", self.max_body, 1),
                                 ("max_prompt_chars", self.max_prompt_chars, 1)):
            if value < low:
                raise InputError(f"{name} must be at least {low}, got {value}")

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
        self.names = SaeAllowList.build(config.served_saes, config.allow_saes,
                                        config.allow_sae_dirs)
        self.scheduler = Scheduler(model, tokenizer, max_batch=config.max_batch,
                                   max_queue=config.max_queue)
        self.stores = [load_store(s) for s in config.stores]
        self._store_of: dict[str, Any] = {}  # readout SAE name -> its store, or None
        self.special = frozenset(special_ids(tokenizer))
        self.max_model_len = context_window(model)

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
        self._preset(req)
        rows = req.n_choices + req.return_baseline
        if rows > self.config.max_batch:
            param = "n" if req.n > 1 else "prompt"
            raise HttpError(400, f"{param}: the request needs {rows} rows (prompts x n), more "
                                 f"than this server's batch of {self.config.max_batch}; send "
                                 "fewer prompts per request", param)
        for spec in req.edits:
            if len(spec.features) > self.config.limits.max_edits:
                raise HttpError(400, f"{spec.param}.feature: {len(spec.features)} features in "
                                     "one edit, more than this server's limit of "
                                     f"{self.config.limits.max_edits} (--max-edits)",
                                f"{spec.param}.feature")
        return req, build(req.edits, self.pool, self.model, names=self.names,
                          readouts=req.readouts)

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
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                            "owned_by": "llamascope-sdk"}
                                           for m in config.model_ids()]}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return tokenizer_api.tokenizer_info(server.tokenizer, config.model_id,
                                            server.max_model_len)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await server.body(request)
        return await run_in_threadpool(tokenizer_api.tokenize, server.tokenizer, body,
                                       server.max_model_len)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await server.body(request)
        return await run_in_threadpool(tokenizer_api.detokenize, server.tokenizer, body)


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
    """A chat or completion request, answered whole or streamed (shaped in :mod:`.choices`)."""
    with server.scheduler.incoming():  # admission waits for requests still being read
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

        return _Stream(choices.stream(server, req, job, steering, request), cleanup)
    try:
        rows = await choices.collect(server, req, job, steering, request)
    finally:
        steering.release()
    return choices.body(server, req, steering, rows)


__all__ = ["ServeConfig", "Server", "create_app"]
