"""An LLM judge for steered text, with the AxBench rubric (Wu et al., ICML 2025).

Three questions per continuation, each answered 0, 1 or 2 by any OpenAI-compatible chat
endpoint (:class:`~llamascope_sdk.base.endpoint.ChatClient`: bounded concurrency, retries with
backoff on 429/5xx, timeouts, usage counted):

* concept: is the concept present in the text (0 absent, 1 somewhat or awkwardly, 2 clearly)?
* instruction relevance: does the text continue / answer the prompt (0 unrelated, 1 partly,
  2 fully)?
* fluency: is it fluent language (0 broken, 1 somewhat fluent, 2 fluent)?

The judge must end with ``Rating: [[N]]``; the score of a continuation is the harmonic mean of
the three (0 when any is 0), as AxBench aggregates. A reply without that line is counted as
unparsable (``report()["unparsable"]``) and its continuation gets no score (None), never a
guess.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from llamascope_sdk.base.endpoint import ChatClient
from llamascope_sdk.base.errors import InputError

RUBRIC = {
    "concept": ("Judge whether the concept below is present in the text fragment. Judge only the "
                "concept, not grammar or style. Answer 0 if the concept is absent, 1 if it is "
                "somewhat present or only awkwardly worked in, 2 if it is clearly present."),
    "instruction": ("Judge whether the text fragment is a relevant continuation of the prompt "
                    "below, ignoring any other topic it brings in. Answer 0 if unrelated, 1 if "
                    "partly related, 2 if it follows the prompt well."),
    "fluency": ("Judge only the fluency of the text fragment: is it well-formed, readable "
                "language? Answer 0 if it is broken or repetitive gibberish, 1 if somewhat "
                "fluent, 2 if fluent."),
}
_RATING = re.compile(r"Rating:\s*\[\[\s*([0-2](?:\.0+)?)\s*\]\]")


def parse_rating(text: str | None) -> float:
    """The N of the last ``Rating: [[N]]`` in ``text`` (0, 1 or 2).

    Raises:
        ValueError: no such line (the client counts the reply as unparsable).
    """
    found = _RATING.findall(text or "")
    if not found:
        raise ValueError(f"no 'Rating: [[0|1|2]]' in the reply {str(text)[:80]!r}")
    return float(found[-1])


def messages(kind: str, prompt: str, text: str, concept: str) -> list[dict[str, str]]:
    """The chat messages of one rubric question."""
    body = (f"{RUBRIC[kind]}\n\nConcept: {concept}\nPrompt: {prompt}\nText fragment: {text}\n\n"
            "Give a one-sentence reason, then the rating in exactly this format: Rating: [[N]]")
    return [{"role": "system", "content": "You are an impartial, strict judge of text."},
            {"role": "user", "content": body}]


def harmonic_mean(scores: Sequence[float | None]) -> float | None:
    """AxBench's aggregate of the three 0-2 scores; None when any is missing."""
    if any(s is None for s in scores):
        return None
    vals = [float(s) for s in scores if s is not None]
    if any(v == 0 for v in vals):
        return 0.0
    return len(vals) / sum(1 / v for v in vals)


class Judge:
    """Callable: ``[(prompt, text, concept)]`` -> one harmonic-mean score (or None) each."""

    def __init__(self, client: Any, *, max_tokens: int = 96):
        self.client = client
        self.max_tokens = max_tokens
        self.items = 0

    def __call__(self, items: Sequence[tuple[str, str, str]]) -> list[float | None]:
        kinds = list(RUBRIC)
        batch = [messages(k, p, t, c) for p, t, c in items for k in kinds]
        replies = self.client.map(batch, max_tokens=self.max_tokens, parse=parse_rating)
        self.items += len(items)
        out = []
        for i in range(len(items)):
            got = replies[i * len(kinds):(i + 1) * len(kinds)]
            out.append(harmonic_mean([r.value for r in got]))
        return out

    def report(self) -> dict[str, Any]:
        """Items judged and the client's usage (requests, retries, tokens, unparsable)."""
        return {"items": self.items, **self.client.usage.as_dict()}


def make_judge(url: str, model: str, *, key_env: str | None = None, concurrency: int = 4,
               timeout: float = 120.0, max_retries: int = 6, backoff: float = 1.0,
               max_tokens: int = 96) -> Judge:
    """A :class:`Judge` on the chat endpoint at ``url`` (key from ``$key_env`` when given).

    Raises:
        InputError: ``key_env`` names an unset variable; a URL that is not http(s).
    """

    key = None
    if key_env:
        key = os.environ.get(key_env)
        if not key:
            raise InputError(f"--judge-key-env {key_env}: that environment variable is not set",
                             hint=f"export {key_env}=... or drop --judge-key-env")
    client = ChatClient(url, model, api_key=key, concurrency=concurrency, timeout=timeout,
                        max_retries=max_retries, backoff=backoff, temperature=0.0)
    return Judge(client, max_tokens=max_tokens)


__all__ = ["Judge", "make_judge", "parse_rating", "harmonic_mean", "RUBRIC"]
