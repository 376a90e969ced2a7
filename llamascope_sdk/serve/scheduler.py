"""The scheduler: one thread owns the model and a :class:`BatchGenerator`; requests join it.

Requests that arrive together are generated together: each step admits the waiting requests
(up to ``max_batch`` rows; a request with ``return_baseline`` is two rows), prefills them in one
forward, and advances every running row in one batched forward.

A request whose client went away is cancelled and its row freed at the next step. Every other
use of the model (``/v1/encode``) runs on the same thread between steps, since hooks placed on
the model apply to every forward.

Admission waits for the rest of a burst. A forward of 8 rows costs about what a forward of 1
costs where it is bound by reading the weights (a small batch on a CPU), so requests that arrive
a few milliseconds apart should be prefilled in one forward, not one each (and then they finish
together). The HTTP layer counts the requests it has received but not yet queued
(:meth:`Scheduler.incoming`: their bodies are being parsed and tokenised). Waiting requests are
admitted once they fill the batch; or once none is on its way and none was queued for a quiet
spell of an eighth of a step (at least ``batch_wait``); or once the oldest has waited one step
(at most ``gather_max``): splitting a burst costs about one more forward, so waiting longer than
that never pays. A step's time is a running average of the last decode steps (steps that
prefilled nothing: a long prompt's prefill says nothing of how far apart a burst's requests
arrive). A lone request waits the quiet spell only. Which rows run together never changes a row's tokens (each row is computed as
if alone), only how many forwards are run.

When ``max_queue`` requests wait already, :meth:`Scheduler.submit` raises
:class:`~llamascope_sdk.serve.errors.QueueFullError` (the HTTP layer answers 429); while it stops,
:class:`~llamascope_sdk.serve.errors.ShuttingDownError` (503). It raises no HTTP errors itself.
:meth:`Scheduler.stop` lets running and waiting requests finish, refuses new ones, then ends
the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from llamascope_sdk.serve.errors import QueueFullError, ShuttingDownError
from llamascope_sdk.steering.batch_generation import BatchGenerator, Row, Token


@dataclass
class Job:
    """A request's rows and where their tokens go (an asyncio queue of the request's loop).

    Events put on ``events``: :class:`~llamascope_sdk.steering.batch_generation.Token` with ``row``
    replaced by the row's index in ``rows``; then None when every row finished, or an
    exception when the batch failed.
    """

    rows: list[Row]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    handles: dict[int, int] = field(default_factory=dict)  # generator handle -> row index
    left: int = 0

    def put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # RuntimeError: the request's loop is gone
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Scheduler:
    """See the module docstring. ``batch_wait``: the shortest quiet spell (seconds, no request
    queued and none on its way) before waiting requests are admitted; ``gather_max``: the
    longest a request waits for others of its burst."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 16, max_queue: int = 64,
                 batch_wait: float = 0.005, gather_max: float = 0.25) -> None:
        if max_batch < 2:
            raise ValueError(f"max_batch must be at least 2 (a steered row and its baseline), got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1 (with 0 every request would be "
                             f"refused as the queue being full), got {max_queue}")
        self.gen = BatchGenerator(model, tokenizer)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.batch_wait = max_batch, max_queue, batch_wait
        self.gather_max = gather_max
        self._incoming = 0  # requests received by the HTTP layer, not queued yet
        self._last_queued = 0.0  # time.monotonic() of the last submit
        self._since: dict[int, float] = {}  # id(job) -> when it was queued
        self.step_s = 0.0  # running average of a step's seconds
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # generator handle -> job
        self._cancel: list[Job] = []  # to drop at the next step
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._stopping = False
        self.steps = 0
        self._decodes = 0  # steps that prefilled nothing (they time step_s)
        self.max_rows_seen = 0
        self._thread = threading.Thread(target=self._loop, name="llamascope-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ from request handlers
    def submit(self, job: Job) -> None:
        """Queue ``job``.

        Raises:
            QueueFullError: ``max_queue`` requests wait already.
            ShuttingDownError: :meth:`stop` was called.
        """
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down; not accepting new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); "
                                     "retry later")
            job.left = len(job.rows)
            self._waiting.append(job)
            self._last_queued = time.monotonic()
            self._since[id(job)] = self._last_queued
            self._cond.notify_all()

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Count a request as on its way while the block runs (the HTTP layer wraps its
        parsing, tokenising and :meth:`submit` in it), so that admission waits for it."""
        with self._cond:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cond:
                self._incoming -= 1
                self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop a job (its client disconnected): waiting, or its rows at the next step.
        Jobs are held (not their ids), so a finished job's id reused by a new job cancels
        nothing; a finished job is simply not found among the running ones."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self._since.pop(id(job), None)
                return
            self._cancel.append(job)
            self._cond.notify_all()

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the scheduler thread between steps (for other uses of the model)."""
        fut: Future[Any] = Future()
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down; not accepting new requests")
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut

    @property
    def load(self) -> dict[str, int]:
        with self._cond:
            return {"running": len({id(j) for j in self._running.values()}),
                    "waiting": len(self._waiting), "rows": self.gen.size}

    def stop(self, timeout: float = 600) -> None:
        """Finish running and waiting requests, refuse new ones, end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._calls or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self._waiting or self._running or self._calls):
                    return
                ready = self._gathered()
                while not ready and not (self._running or self._calls):
                    self._cond.wait(max(self._gather_left(), 1e-4))  # idle: let the burst come
                    ready = self._gathered()
                calls = list(self._calls)
                self._calls.clear()
                gone = {id(j) for j in self._cancel}  # the jobs are alive here: ids are unique
                cancelled = {h for h, j in self._running.items() if id(j) in gone}
                self._cancel.clear()
                admit = []
                rows = self.gen.size - len(cancelled)
                while ready and self._waiting and \
                        rows + len(self._waiting[0].rows) <= self.max_batch:
                    job = self._waiting.popleft()
                    self._since.pop(id(job), None)
                    rows += len(job.rows)
                    admit.append(job)
            for fn, fut in calls:
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # noqa: BLE001  (handed to the caller)
                    fut.set_exception(exc)
            for h in cancelled:
                self.gen.cancel(h)
                with self._cond:
                    self._running.pop(h, None)
            for job in admit:
                self._admit(job)
            if self.gen.busy:
                self._step(prefill=bool(admit))

    def _windows(self) -> tuple[float, float]:
        """(quiet spell, longest wait) in seconds, from the step time (module docstring)."""
        longest = min(self.gather_max, max(self.batch_wait, self.step_s))
        return min(longest, max(self.batch_wait, self.step_s / 8)), longest

    def _gathered(self) -> bool:
        """Whether the waiting requests may be admitted now (see the module docstring); called
        holding the lock."""
        if not self._waiting or self._stopping:
            return True
        if sum(len(j.rows) for j in self._waiting) >= self.max_batch - self.gen.size:
            return True
        return self._gather_left() <= 0

    def _gather_left(self) -> float:
        """Seconds until the waiting requests may be admitted without a notify (lock held)."""
        now = time.monotonic()
        quiet, longest = self._windows()
        oldest = self._since.get(id(self._waiting[0]), now) if self._waiting else now
        left = longest - (now - oldest)
        if self._incoming == 0:
            left = min(left, quiet - (now - self._last_queued))
        return left

    def _admit(self, job: Job) -> None:
        try:
            for i, row in enumerate(job.rows):
                h = self.gen.add(row)
                job.handles[h] = i
                with self._cond:
                    self._running[h] = job
        except Exception as exc:  # a row the generator refuses: the whole request fails
            for h in job.handles:
                self.gen.cancel(h)
                with self._cond:
                    self._running.pop(h, None)
            job.put(exc)

    def _step(self, prefill: bool = False) -> None:
        self.max_rows_seen = max(self.max_rows_seen, self.gen.size)
        t0 = time.monotonic()
        try:
            # inference mode (no version counters or autograd metadata on the tensors it
            # makes): 3% of a step of 8 rows, 1% of one row (SmolLM2-135M, one CPU thread).
            # Only the generator's own tensors are made here; what it hands out (token ids,
            # floats, readout values turned into JSON) is never updated in place.
            with torch.inference_mode():
                events: list[Token] = self.gen.step()
        except Exception as exc:  # noqa: BLE001  every running request learns of it
            with self._cond:
                jobs = {id(j): j for j in self._running.values()}
                self._running.clear()
            for j in jobs.values():
                j.put(exc)
            self.gen = BatchGenerator(self.model, self.tokenizer)
            return
        self.steps += 1
        # step_s is the time of a decode step: a step that prefilled new rows is left out, or
        # one long prompt (a 512-token loglikelihood request: a 2 s step) would make the next
        # lone request wait a quiet spell of up to gather_max (by the average: 74 ms after one
        # such request, 118 ms after two; 4-6% of the next one) for a burst that is not coming.
        if not prefill:
            took = time.monotonic() - t0
            self._decodes += 1
            self.step_s = took if self._decodes == 1 else 0.75 * self.step_s + 0.25 * took
        for e in events:
            with self._cond:
                job = self._running.get(e.row)
            if job is None:
                continue
            job.put(replace(e, row=job.handles[e.row]))
            if e.finish is not None:
                with self._cond:
                    self._running.pop(e.row, None)
                job.left -= 1
                if job.left == 0:
                    job.put(None)
