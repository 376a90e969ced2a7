"""Request bodies: parsed and checked field by field, each error one line naming the field.

Chat and completion bodies follow the OpenAI API (``messages`` or ``prompt``, ``max_tokens``,
``temperature``, ``top_p``, ``seed``, ``stream``, ``stream_options``, ``n``, ``stop``; completions
``echo`` and ``logprobs``, chat ``logprobs`` and ``top_logprobs``); three fields are this server's
own: ``steering`` (a list of edits, or false), ``readout`` (features to read per token) and
``return_baseline``; the first two are the steering spec's (:mod:`llamascope_sdk.steering.spec`).
``stop`` (a string or up to 4) ends a choice before the first of them, which is not included,
with finish_reason "stop".
A completion's ``prompt`` is a string, a list of token ids, or a list of either (one choice per
prompt and sample). The fields a request may send are listed (:data:`FIELDS`); any other field,
and a listed one the server cannot honour set to anything but its neutral value
(``presence_penalty`` other than 0, ``logit_bias``, ``tools``, ...), is refused with a 400 naming
it, never ignored. Fields without an effect on the output (``user``, ``metadata``) are accepted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from llamascope_sdk.base.errors import FieldError
from llamascope_sdk.loading.models import check_fits_window, tokenize
from llamascope_sdk.serve.errors import HttpError
from llamascope_sdk.serve.fields import (
    chat_logprobs,
    check_fields,
    completion_logprobs,
    include_usage,
)
from llamascope_sdk.steering.spec import (
    ReadoutEntry,
    SteeringEntry,
    parse_readout,
    parse_steering,
)


@dataclass
class Limits:
    """What one request may ask for."""

    max_edits: int = 16
    max_readouts: int = 4
    max_tokens: int = 1024
    default_max_tokens: int = 128


EditSpec = SteeringEntry  #: one checked entry of ``steering`` (the steering spec's)


@dataclass
class GenRequest:
    """A checked chat or completion request: ``prompts`` (token ids; ``texts`` the strings they
    came from, None for prompts given as ids), ``n`` samples of each."""

    chat: bool
    prompts: list[list[int]]
    texts: list[str | None]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    return_baseline: bool
    model: str | None
    edits: list[SteeringEntry] = field(default_factory=list)
    readouts: list[ReadoutEntry] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    n: int = 1
    echo: bool = False
    logprobs: int | None = None  #: top-N alternatives per token; None: no log-probabilities
    include_usage: bool = False

    @property
    def ids(self) -> list[int]:
        """The first prompt's token ids."""
        return self.prompts[0]

    @property
    def n_choices(self) -> int:
        """Choices in the answer: prompts x n (a baseline row comes on top)."""
        return len(self.prompts) * self.n


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying why not."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise HttpError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise HttpError(400, f"{key} must be a finite number, got {v!r}", key)
    if not lo <= v <= hi:
        raise HttpError(400, f"{key} must be between {lo:g} and {hi:g}, got {v!r}", key)
    return float(v)


def _int(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise HttpError(400, f"{key} must be an integer, got {v!r}", key)
    if not lo <= v <= hi:
        raise HttpError(400, f"{key} must be between {lo} and {hi}, got {v}", key)
    return v


def _bool(body: dict[str, Any], key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise HttpError(400, f"{key} must be true or false, got {v!r}", key)
    return v


def parse_generation(body: dict[str, Any], *, chat: bool, tokenizer: Any, model: Any,
                     limits: Limits) -> GenRequest:
    """Check a chat (``chat=True``) or completion body and tokenise its prompts."""
    check_fields(body, chat=chat)
    stop = _stop(body.get("stop"))
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise HttpError(400, f"model must be a string, got {name!r}", "model")
    echo = not chat and _bool(body, "echo")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, limits.default_max_tokens, 0 if echo else 1, limits.max_tokens)
    assert max_tokens is not None
    texts: list[str | None] = [None]
    if chat:
        prompts = [_chat_ids(body, tokenizer)]
    else:
        prompts, texts = _completion_prompts(body, tokenizer)
    for i, ids in enumerate(prompts):
        try:
            check_fits_window(model, len(ids), max_tokens)
        except ValueError as exc:
            where = f"prompt[{i}] " if len(prompts) > 1 else ""
            raise HttpError(400, f"{key}: {where}{exc}", key) from None
    n = _int(body, "n", 1, 1, MAX_N)
    stream = _bool(body, "stream")
    req = GenRequest(
        chat=chat, prompts=prompts, texts=texts, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=_int(body, "seed", None, -(2**63), 2**63 - 1),
        stream=stream, return_baseline=_bool(body, "return_baseline"), model=name, stop=stop,
        n=n or 1, echo=echo, include_usage=include_usage(body, stream),
        logprobs=chat_logprobs(body) if chat else completion_logprobs(body))
    if req.top_p == 0:
        raise HttpError(400, "top_p must be greater than 0", "top_p")
    req.edits, req.readouts = parse_edits(body, chat=chat, limits=limits)
    if req.return_baseline and req.n_choices > 1:
        raise HttpError(400, "return_baseline needs a single choice (one prompt, n 1); send "
                             "the prompts one by one", "return_baseline")
    return req


MAX_STOP = 4  #: as OpenAI's API
MAX_N = 128  #: choices per prompt at most (all of a request's rows must also fit one batch)


def _stop(raw: Any) -> list[str]:
    """``stop``: null, a string or a list of up to :data:`MAX_STOP` non-empty strings."""
    if raw is None or raw == [] or raw == "":
        return []
    stops = [raw] if isinstance(raw, str) else raw
    if (not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP
            or not all(isinstance(x, str) and x for x in stops)):
        raise HttpError(400, f"stop must be a non-empty string or a list of 1 to {MAX_STOP} "
                             f"non-empty strings, got {raw!r}", "stop")
    return list(stops)


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where ``text`` is cut: the start of the earliest stop string in it, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _chat_ids(body: dict[str, Any], tokenizer: Any) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise HttpError(400, "messages must be a non-empty list of {role, content}", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise HttpError(400, f"messages[{i}] must be an object with role system, user or "
                                 "assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise HttpError(400, f"messages[{i}].content: only text parts are supported",
                                f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise HttpError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        clean.append({"role": m["role"], "content": content})
    if not getattr(tokenizer, "chat_template", None):
        raise HttpError(400, "this model's tokenizer has no chat template; use /v1/completions",
                        "messages")
    ids = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _completion_prompts(body: dict[str, Any], tokenizer: Any) -> tuple[list[list[int]], list[str | None]]:
    """``prompt``: a string, a list of token ids, or a non-empty list of either; the token ids
    of each prompt and the text it came from (None for token ids)."""
    p = body.get("prompt")
    many = isinstance(p, list) and bool(p) and all(isinstance(x, (str, list)) for x in p)
    items: list[Any] = list(p) if many and isinstance(p, list) else [p]
    prompts = [_one_prompt(x, tokenizer, f"prompt[{i}]" if many else "prompt")
               for i, x in enumerate(items)]
    return prompts, [x if isinstance(x, str) else None for x in items]


def _one_prompt(p: Any, tokenizer: Any, param: str) -> list[int]:
    if isinstance(p, str):
        if not p:
            raise HttpError(400, f"{param} is empty", "prompt")
        return [int(i) for i in tokenize(tokenizer, p)[0]]
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        vocab = len(tokenizer)
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise HttpError(400, f"{param}: token id {bad[0]} is out of range; allowed are "
                                 f"0..{vocab - 1}", "prompt")
        return list(p)
    raise HttpError(400, f"{param} must be a non-empty string or a non-empty list of token ids "
                         "(or prompt a list of these)", "prompt")


def parse_edits(body: dict[str, Any], *, chat: bool,
                limits: Limits) -> tuple[list[SteeringEntry], list[ReadoutEntry]]:
    """The ``steering`` and ``readout`` fields, read by the steering spec
    (:mod:`llamascope_sdk.steering.spec`); a bad entry is a 400 naming its field. In a chat,
    edits apply to the reply (``positions: "generated"``) unless they say otherwise."""
    steering = parse_steering_list(body.get("steering"), chat=chat, limits=limits)
    try:
        return steering, parse_readout(body.get("readout"), max_readouts=limits.max_readouts)
    except FieldError as exc:
        raise HttpError(400, str(exc), exc.field) from None


def parse_steering_list(raw: Any, *, chat: bool, limits: Limits) -> list[SteeringEntry]:
    """A ``steering`` field's value (a request's, or a ``--preset`` file's) read by the steering
    spec; a bad entry is a 400 naming its field."""
    try:
        return parse_steering(raw, max_edits=limits.max_edits,
                              default_positions="generated" if chat else "all")
    except FieldError as exc:
        raise HttpError(400, str(exc), exc.field) from None
