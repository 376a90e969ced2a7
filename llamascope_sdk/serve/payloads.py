"""Request bodies: parsed and checked field by field, each error one line naming the field.

Chat and completion bodies follow the OpenAI API (``messages`` or ``prompt``, ``max_tokens``,
``temperature``, ``top_p``, ``seed``, ``stream``); two fields are this server's own:
``steering`` (a list of edits, or false) and ``return_baseline``. ``stop`` (a string or up to 4)
ends a choice before the first of them, which is not included, with finish_reason "stop".
Fields the server does not read (``user``, ``stream_options``, ...) are ignored; fields it
cannot honour (``n`` > 1) are refused rather than ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from llamascope_sdk.loading.models import check_fits_window, tokenize
from llamascope_sdk.serve.errors import HttpError

MODES = ("add", "clamp", "scale", "ablate")
POSITIONS = ("prompt", "generated", "all")
EDIT_FIELDS = ("sae", "feature", "mode", "value", "relative", "positions", "mean")


@dataclass
class Limits:
    """What one request may ask for."""

    max_edits: int = 16
    max_tokens: int = 1024
    default_max_tokens: int = 128


@dataclass
class EditSpec:
    """One checked entry of ``steering``; ``param`` names it in errors (``steering[2]``)."""

    sae: str
    features: list[int]
    mode: str
    value: float | list[float] | None
    relative: bool
    positions: str
    mean: bool
    param: str


@dataclass
class GenRequest:
    """A checked chat or completion request."""

    chat: bool
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    return_baseline: bool
    model: str | None
    edits: list[EditSpec] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)


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
    """Check a chat (``chat=True``) or completion body and tokenise its prompt."""
    if body.get("n") not in (None, 1):
        raise HttpError(400, f"n must be 1 (one choice per request), got {body.get('n')!r}", "n")
    stop = _stop(body.get("stop"))
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise HttpError(400, f"model must be a string, got {name!r}", "model")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, limits.default_max_tokens, 1, limits.max_tokens)
    assert max_tokens is not None
    ids = _chat_ids(body, tokenizer) if chat else _completion_ids(body, tokenizer)
    try:
        check_fits_window(model, len(ids), max_tokens)
    except ValueError as exc:
        raise HttpError(400, f"{key}: {exc}", key) from None
    req = GenRequest(
        chat=chat, ids=ids, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=_int(body, "seed", None, -(2**63), 2**63 - 1),
        stream=_bool(body, "stream"), return_baseline=_bool(body, "return_baseline"),
        model=name, stop=stop)
    if req.top_p == 0:
        raise HttpError(400, "top_p must be greater than 0", "top_p")
    req.edits = parse_steering(body.get("steering"), chat=chat, limits=limits)
    if req.return_baseline and req.stream:
        raise HttpError(400, "return_baseline cannot be combined with stream; send two "
                             "requests or drop stream", "return_baseline")
    return req


MAX_STOP = 4  #: as OpenAI's API


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


def _completion_ids(body: dict[str, Any], tokenizer: Any) -> list[int]:

    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise HttpError(400, "prompt is empty", "prompt")
        return [int(i) for i in tokenize(tokenizer, p)[0]]
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        vocab = len(tokenizer)
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise HttpError(400, f"prompt: token id {bad[0]} is out of range; allowed are "
                                 f"0..{vocab - 1}", "prompt")
        return list(p)
    raise HttpError(400, "prompt must be a non-empty string (or one list of token ids); "
                         "one prompt per request", "prompt")


def parse_steering(raw: Any, *, chat: bool, limits: Limits) -> list[EditSpec]:
    """The ``steering`` field: absent, null or false (no edits), or a list of edit objects."""
    if raw is None or raw is False:
        return []
    if not isinstance(raw, list):
        raise HttpError(400, f"steering must be a list of edits or false, got {raw!r}", "steering")
    if len(raw) > limits.max_edits:
        raise HttpError(400, f"steering has {len(raw)} edits, more than the limit of "
                             f"{limits.max_edits} per request", "steering")
    return [_edit(e, f"steering[{i}]", chat) for i, e in enumerate(raw)]


def _edit(e: Any, param: str, chat: bool) -> EditSpec:
    if not isinstance(e, dict):
        raise HttpError(400, f"{param} must be an object with sae, feature, mode and value", param)
    unknown = sorted(set(e) - set(EDIT_FIELDS))
    if unknown:
        raise HttpError(400, f"{param}: unknown field {unknown[0]!r}; allowed are "
                             f"{', '.join(EDIT_FIELDS)}", f"{param}.{unknown[0]}")
    sae = e.get("sae")
    if not isinstance(sae, str) or not sae.strip():
        raise HttpError(400, f"{param}.sae must be an SAE name (e.g. 'demo' or 'L12R-8x')", f"{param}.sae")
    feat = e.get("feature")
    feats = feat if isinstance(feat, list) else [feat]
    if not feats or not all(isinstance(f, int) and not isinstance(f, bool) for f in feats):
        raise HttpError(400, f"{param}.feature must be an integer or a non-empty list of "
                             f"integers, got {feat!r}", f"{param}.feature")
    mode = e.get("mode", "add")
    if mode not in MODES:
        raise HttpError(400, f"{param}.mode: unknown mode {mode!r}; allowed are "
                             f"{', '.join(MODES)}", f"{param}.mode")
    value = e.get("value")
    if mode == "ablate":
        if value is not None:
            raise HttpError(400, f"{param}.value: ablate takes no value (use \"mean\": true for "
                                 "mean ablation)", f"{param}.value")
    else:
        vals = value if isinstance(value, list) else [value]
        if value is None or not vals or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            raise HttpError(400, f"{param}.value must be a number (or one per feature) for "
                                 f"mode {mode}, got {value!r}", f"{param}.value")
        if not all(math.isfinite(v) for v in vals if v is not None):
            raise HttpError(400, f"{param}.value must be finite, got {value!r}", f"{param}.value")
    relative = e.get("relative", False)
    if not isinstance(relative, bool) or (relative and mode != "add"):
        raise HttpError(400, f"{param}.relative must be true or false, and true only with mode "
                             "add", f"{param}.relative")
    mean = e.get("mean", False)
    if not isinstance(mean, bool) or (mean and mode != "ablate"):
        raise HttpError(400, f"{param}.mean must be true or false, and true only with mode "
                             "ablate", f"{param}.mean")
    positions = e.get("positions", "generated" if chat else "all")
    if positions not in POSITIONS:
        raise HttpError(400, f"{param}.positions: {positions!r} is not allowed; allowed are "
                             f"{', '.join(POSITIONS)}", f"{param}.positions")
    return EditSpec(sae.strip(), [int(f) for f in feats if f is not None], mode, value, relative, positions, mean, param)
