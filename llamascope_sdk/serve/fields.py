"""Which fields of a chat or completion body the server reads, which it refuses, and the
small ones (``logprobs``, ``top_logprobs``, ``stream_options``) checked on their own.

A field the server cannot honour is refused with a 400 naming it, never silently ignored: an
unknown field (a typo such as ``max_token``, or another server's extension such as ``top_k``),
and a known OpenAI field set to anything but its neutral value (``presence_penalty: 0.5``,
``logit_bias: {...}``, ``tools: [...]``, ``best_of: 3``). Fields that change nothing about the
output (``user``, ``metadata``, ``store``, ``service_tier``) and nulls are accepted.
"""

from __future__ import annotations

from typing import Any

from llamascope_sdk.serve.errors import HttpError
from llamascope_sdk.steering.logprobs import MAX_TOP

#: read by both endpoints (``steering`` and ``return_baseline`` are this server's own)
COMMON = ("model", "max_tokens", "temperature", "top_p", "seed", "stream", "stream_options", "n",
          "stop", "steering", "return_baseline")
#: read by /v1/completions only
COMPLETION = ("prompt", "echo", "logprobs")
#: read by /v1/chat/completions only
CHAT = ("messages", "max_completion_tokens", "logprobs", "top_logprobs")
#: accepted and without effect on the output
INERT = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
#: OpenAI fields this server cannot honour, and the values that mean "not used"
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
    "best_of": (1,), "suffix": ("",), "tools": ([],), "functions": ([],),
    "tool_choice": ("none",), "function_call": ("none",), "response_format": ({"type": "text"},),
}
#: fields that other parts of the server read (``readout``: the steering spec's feature readout)
EXTRA: list[str] = ["readout"]


def check_fields(body: dict[str, Any], *, chat: bool) -> None:
    """Refuse an unknown field, or a field the server cannot honour set to a non-neutral value."""
    known = set(COMMON) | set(CHAT if chat else COMPLETION) | set(INERT) | set(EXTRA)
    for key in sorted(body):
        value = body[key]
        if value is None or key in known:
            continue
        if key in NEUTRAL:
            if value in NEUTRAL[key] or (key == "best_of" and value == body.get("n", 1)):
                continue
            raise HttpError(400, f"{key}={value!r} is not supported by this server (it would "
                                 f"be ignored); drop the field", key)
        allowed = ", ".join(sorted(known - set(INERT)))
        raise HttpError(400, f"unknown field {key!r} for {'chat' if chat else 'completion'} "
                             f"requests; this server reads {allowed}", key)


def chat_logprobs(body: dict[str, Any]) -> int | None:
    """Chat's ``logprobs`` (true/false) and ``top_logprobs`` (0..20, needs ``logprobs``) as
    the number of alternatives per token, or None without log-probabilities."""
    on, top = body.get("logprobs"), body.get("top_logprobs")
    if on is not None and not isinstance(on, bool):
        raise HttpError(400, f"logprobs must be true or false in chat, got {on!r}", "logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int)
                            or not 0 <= top <= MAX_TOP):
        raise HttpError(400, f"top_logprobs must be an integer in 0..{MAX_TOP}, got {top!r}",
                        "top_logprobs")
    if top is not None and not on:
        raise HttpError(400, "top_logprobs needs \"logprobs\": true", "top_logprobs")
    return (top or 0) if on else None


def completion_logprobs(body: dict[str, Any]) -> int | None:
    """Completions' ``logprobs``: an integer 0..20 (alternatives per token), or null."""
    v = body.get("logprobs")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOP:
        raise HttpError(400, f"logprobs must be an integer in 0..{MAX_TOP} (alternatives per "
                             f"token) for completions, got {v!r}", "logprobs")
    return v


def include_usage(body: dict[str, Any], stream: bool) -> bool:
    """``stream_options``: null or ``{"include_usage": bool}``, only with ``stream``."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise HttpError(400, "stream_options is only allowed with \"stream\": true",
                        "stream_options")
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise HttpError(400, f"stream_options must be {{\"include_usage\": true|false}}, got "
                             f"{opts!r}", "stream_options")
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise HttpError(400, f"stream_options.include_usage must be true or false, got "
                             f"{usage!r}", "stream_options.include_usage")
    return usage


__all__ = ["CHAT", "COMMON", "COMPLETION", "EXTRA", "INERT", "NEUTRAL", "chat_logprobs",
           "check_fields", "completion_logprobs", "include_usage"]
