"""A request's choices as OpenAI's API shapes them: the text, the ``logprobs`` objects, usage,
and the server-sent events of a stream.

A request runs as rows (:meth:`.payloads.GenRequest.rows`): choice ``i`` is row ``i`` (prompt
``i // n``, sample ``i % n``, as OpenAI numbers them); with ``return_baseline`` one more row
without edits follows. :class:`RowOut` collects what a row produced; :func:`completion_body` and
:func:`chat_body` shape the answer; :func:`stream` sends it as it comes.

Log-probabilities (``logprobs`` on completions, ``logprobs``/``top_logprobs`` in chat):

* completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, with ``echo`` the
  prompt's tokens first (the first one's log-probability and alternatives ``null``), then the
  generated tokens. ``tokens`` are the tokens' own strings (special tokens spelled out);
  ``text_offset[i]`` is where token ``i`` starts in the choice's ``text``: special tokens, which
  ``text`` leaves out, add no length.
* chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}``.

Tokens after a stop string (cut from the text) are left out of the log-probabilities too.

Readouts (the ``readout`` field): each choice's ``readout`` lists, per readout, the features read
at each position (:class:`~llamascope_sdk.serve.steering.ReadoutLog`); a stream sends each
position's values with the next event of its choice. The baseline row reads nothing.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llamascope_sdk.serve.decoding import ReplyText
from llamascope_sdk.serve.errors import HttpError
from llamascope_sdk.serve.payloads import GenRequest
from llamascope_sdk.steering.logprobs import Logprobs

if TYPE_CHECKING:
    from llamascope_sdk.serve.app import Server
    from llamascope_sdk.serve.scheduler import Job
    from llamascope_sdk.serve.steering import ReadoutLog, Steering
    from llamascope_sdk.steering.batch_generation import Token


@dataclass
class RowOut:
    """What one row produced: token ids, its text (decoded as the tokens come, the stop
    strings searched there), finish reason, the stop cut, log-probabilities, and its readouts
    (``log``, None for a row that reads nothing)."""

    ids: list[int] = field(default_factory=list)
    finish: str = "length"
    cut: int | None = None  # where a stop string starts in the decoded text
    done: bool = False
    logprobs: Logprobs = field(default_factory=Logprobs)
    prompt: Logprobs | None = None
    log: ReadoutLog | None = None
    text: ReplyText = field(default_factory=lambda: ReplyText(None))

    def add(self, t: Token) -> list[dict[str, Any]]:
        """Take event ``t``; returns the readouts it brought as JSON (empty when none)."""
        read = self.log.add(t.readout, t.read_ids) if self.log is not None else []
        if t.prompt is not None:
            self.prompt = t.prompt
        if t.token is not None:
            self.ids.append(t.token)
            if t.logprob is not None:
                self.logprobs.token.append(t.logprob)
                self.logprobs.top.append(list(t.top or []))
        self.text.add(t.token, final=t.finish is not None)
        if t.finish:
            self.finish, self.done = t.finish, True
        if self.text.stop_at is not None:  # a stop string: the row ends there
            self.cut, self.finish, self.done = self.text.stop_at, "stop", True
        return read


def _rows(server: Server, req: GenRequest, job: Job, steering: Steering) -> list[RowOut]:
    """One empty :class:`RowOut` per row of ``job``; the choices' with a readout log."""
    return [RowOut(log=server.readout_log(steering) if i < req.n_choices and steering.readouts
                   else None, text=ReplyText(server.tokenizer, req.stop))
            for i in range(len(job.rows))]


async def collect(server: Server, req: GenRequest, job: Job, steering: Steering,
                  request: Any) -> list[RowOut]:
    """Every row's output (non-streamed); a row that meets a stop string ends there."""
    rows = _rows(server, req, job, steering)
    async for t in server.tokens(job, request, watch=True):
        out = rows[t.row]
        if out.done:
            continue  # this row met a stop string; the others still run
        out.add(t)
        if all(r.done for r in rows):
            break  # leaving server.tokens cancels the job: its rows are freed
    return rows


# ---------------------------------------------------------------------- log-probability objects
def _kept(server: Server, out: RowOut) -> int:
    """How many generated tokens lie before the stop cut (all when there is none)."""
    if out.cut is None:
        return len(out.ids)
    n = 0
    while n < len(out.ids) and len(server.decode(out.ids[:n])) < out.cut:
        n += 1
    return n


def _completion_logprobs(server: Server, ids: list[int], lp: Logprobs,
                         start: int = 0) -> dict[str, Any]:
    """OpenAI's completions ``logprobs`` object for tokens ``ids`` (offsets from ``start``)."""
    tokens = [server.piece(i) for i in ids]
    offsets, at = [], start
    for i, s in zip(ids, tokens, strict=True):
        offsets.append(at)
        at += 0 if i in server.special else len(s)
    top = [None if not alts and v is None else {server.piece(j): x for j, x in alts}
           for v, alts in zip(lp.token, lp.top, strict=True)]
    return {"tokens": tokens, "token_logprobs": list(lp.token), "top_logprobs": top,
            "text_offset": offsets}


def _chat_logprobs(server: Server, ids: list[int], lp: Logprobs) -> dict[str, Any]:
    def entry(i: int, x: float | None) -> dict[str, Any]:
        s = server.piece(i)
        return {"token": s, "logprob": x, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(i, x), "top_logprobs": [entry(j, y) for j, y in alts]}
                        for i, x, alts in zip(ids, lp.token, lp.top, strict=True)]}


def _prefix(lp: Logprobs, n: int) -> Logprobs:
    return Logprobs(token=lp.token[:n], top=lp.top[:n])


# ---------------------------------------------------------------------- whole answers
def _echo(server: Server, req: GenRequest, i: int) -> str:
    text = req.texts[i]
    return text if text is not None else server.decode(req.prompts[i])


def _usage(req: GenRequest, rows: list[RowOut]) -> dict[str, int]:
    prompt = sum(len(p) for p in req.prompts)
    done = sum(len(r.ids) for r in rows[:req.n_choices])
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _text(out: RowOut) -> str:
    return out.text.reply  # up to the stop string, if one came


def _completion_choice(server: Server, req: GenRequest, i: int, out: RowOut) -> dict[str, Any]:
    p = i // req.n
    text = _text(out)
    kept = _kept(server, out)
    choice: dict[str, Any] = {"index": i, "text": text, "finish_reason": out.finish,
                              "logprobs": None}
    if req.echo:
        choice["text"] = _echo(server, req, p) + text
    if req.logprobs is not None:
        lp, ids = _prefix(out.logprobs, kept), out.ids[:kept]
        if req.echo:
            assert out.prompt is not None
            head = Logprobs(list(out.prompt.token), list(out.prompt.top))
            head.extend(lp)
            lp, ids = head, list(req.prompts[p]) + ids
        choice["logprobs"] = _completion_logprobs(server, ids, lp)
    return choice


def _chat_choice(server: Server, req: GenRequest, i: int, out: RowOut) -> dict[str, Any]:
    kept = _kept(server, out)
    return {"index": i, "message": {"role": "assistant", "content": _text(out)},
            "finish_reason": out.finish,
            "logprobs": None if req.logprobs is None else
            _chat_logprobs(server, out.ids[:kept], _prefix(out.logprobs, kept))}


def _with_readout(choice: dict[str, Any], out: RowOut) -> dict[str, Any]:
    if out.log is not None:
        choice["readout"] = out.log.json()
    return choice


def body(server: Server, req: GenRequest, steering: Steering, rows: list[RowOut]) -> dict[str, Any]:
    """The whole (non-streamed) answer."""
    shape = _chat_choice if req.chat else _completion_choice
    out: dict[str, Any] = {
        "id": f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if req.chat else "text_completion",
        "created": int(time.time()), "model": server.config.model_id,
        "choices": [_with_readout(shape(server, req, i, rows[i]), rows[i])
                    for i in range(req.n_choices)],
        "usage": _usage(req, rows), "steering": {"applied": steering.applied},
    }
    if req.return_baseline:
        base = rows[req.n_choices]
        out["steering"]["baseline"] = {"text": _text(base), "finish_reason": base.finish,
                                       "completion_tokens": len(base.ids)}
    return out


# ---------------------------------------------------------------------- streams
@dataclass
class _Sent:
    """A streamed row: its tokens, the text sent so far, the tokens not yet sent."""

    out: RowOut = field(default_factory=RowOut)
    sent: int = 0  # characters of the row's text sent so far
    started: bool = False
    offset: int = 0  # text_offset of the next token (completions)
    queued: list[int] = field(default_factory=list)
    queued_lp: Logprobs = field(default_factory=Logprobs)
    pending: list[dict[str, Any]] = field(default_factory=list)  # readouts not sent yet


class _Events:
    """Builds the server-sent events of one streamed request."""

    def __init__(self, server: Server, req: GenRequest, steering: Steering) -> None:
        self.server, self.req, self.steering = server, req, steering
        self.id = f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.req.chat
                                else "text_completion", "created": self.created,
                                "model": self.server.config.model_id, "choices": choices, **extra}
        if self.req.include_usage and "usage" not in body:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def first(self) -> str:
        """The opening event: the steering applied, each choice empty (in chat, its role)."""
        choices = [{"index": i, "delta": {"role": "assistant", "content": ""},
                    "finish_reason": None, "logprobs": None} if self.req.chat else
                   {"index": i, "text": "", "finish_reason": None, "logprobs": None}
                   for i in range(self.req.n_choices)]
        return self.event(choices, steering={"applied": self.steering.applied})

    def piece(self, i: int, row: _Sent, text: str, finish: str | None) -> str:
        lp: dict[str, Any] | None = None
        if self.req.logprobs is not None and row.queued:
            if self.req.chat:
                lp = _chat_logprobs(self.server, row.queued, row.queued_lp)
            else:
                lp = _completion_logprobs(self.server, row.queued, row.queued_lp, row.offset)
                row.offset = lp["text_offset"][-1] + (
                    0 if row.queued[-1] in self.server.special else len(lp["tokens"][-1]))
            row.queued, row.queued_lp = [], Logprobs()
        choice: dict[str, Any] = ({"index": i, "delta": {"content": text} if text else {},
                                   "finish_reason": finish, "logprobs": lp} if self.req.chat else
                                  {"index": i, "text": text, "finish_reason": finish,
                                   "logprobs": lp})
        if row.pending:
            choice["readout"], row.pending = row.pending, []
        return self.event([choice])

    def baseline(self, text: str, finish: str | None) -> str:
        return self.event([], steering={"baseline": {"text": text, "finish_reason": finish}})


def _advance(server: Server, req: GenRequest, row: _Sent, t: Token, prompt: int) -> tuple[str, str | None] | None:
    """Take token ``t`` into ``row``; the text to send now and the finish reason, or None when
    nothing is to be sent yet (a character or a stop string may still be forming)."""
    first = not row.started
    row.started = True
    row.pending += row.out.add(t)
    if t.token is not None and t.logprob is not None:
        row.queued.append(t.token)
        row.queued_lp.extend(Logprobs([t.logprob], [list(t.top or [])]))
    head = ""
    if first and req.echo:
        head = _echo(server, req, prompt)
        if row.out.prompt is not None:
            lp = Logprobs(list(row.out.prompt.token), list(row.out.prompt.top))
            lp.extend(row.queued_lp)
            row.queued, row.queued_lp = list(req.prompts[prompt]) + row.queued, lp
    text = row.out.text.text  # whole characters only: a half one waits for the rest
    at = row.out.text.stop_at
    if at is not None:  # RowOut.add ended the row there
        piece, row.sent = text[row.sent:at], at
        return head + piece, "stop"
    hold = max((len(x) for x in req.stop), default=1) - 1  # a stop string may be forming
    end = len(text) if t.finish else max(row.sent, len(text) - hold)
    piece, row.sent = text[row.sent:end], end
    if head or piece or t.finish or row.pending:
        return head + piece, t.finish
    return None


async def stream(server: Server, req: GenRequest, job: Job, steering: Steering,
                 request: Any) -> AsyncIterator[str]:
    """Server-sent events: each choice's text in pieces that concatenate to the non-streamed
    text (with ``stop``, the last few characters wait until no stop string can be forming),
    the baseline's pieces in ``steering.baseline``, then the usage with
    ``stream_options.include_usage``, then ``[DONE]``."""
    ev = _Events(server, req, steering)
    rows = [_Sent(out=out) for out in _rows(server, req, job, steering)]
    try:
        yield ev.first()
        async for t in server.tokens(job, request):
            row = rows[t.row]
            if row.out.done:
                continue
            got = _advance(server, req, row, t, min(t.row, req.n_choices - 1) // req.n)
            if got is not None:
                text, finish = got
                yield (ev.baseline(text, finish) if t.row >= req.n_choices else
                       ev.piece(t.row, row, text, finish))
            if all(r.out.done for r in rows):
                break  # leaving server.tokens cancels the job
        if req.include_usage:
            yield ev.event([], usage=_usage(req, [r.out for r in rows]))
        yield "data: [DONE]\n\n"
    except HttpError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        steering.release()


__all__ = ["RowOut", "body", "collect", "stream"]
