"""What a run will send, counted before anything is sent: requests and tokens.

The prompts are built exactly as the run builds them (same examples, same shuffles, same
batches); only the explanation (written into every scorer prompt) and the replies are not known
in advance, so they count as :data:`EXPLANATION_GUESS` and a well-formed scorer answer
(``[1, 0, 1, 0, 1]``). Tokens are counted with ``count_tokens`` (the explainer's tokenizer when
it can be loaded, else :func:`approx_tokens`), plus what a chat template adds: ``per_message``
tokens per message and ``per_request`` per request (OpenAI documents 3 to 4 and 3; ChatML
templates such as SmolLM2's add 5 and 3). When the tokenizer has a chat template,
``count_messages`` applies it to each conversation instead, which is exact for a server running
that model (it includes, for example, the default system message SmolLM2's template adds when a
conversation has none: about 30 tokens a request). Completions cannot be counted in advance:
the estimate takes a typical reply, and ``completion_max`` is the bound if every reply runs to
its ``max_tokens`` (small models often do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llamascope_sdk.explain.examples import ExampleSets
from llamascope_sdk.explain.prompts import expected_answer, explainer_messages, scorer_messages
from llamascope_sdk.explain.scoring import MAX_TOKENS_PER_ITEM, SCORERS, batches, items_for, rng_for

#: A typical one-line explanation, counted in place of the one the explainer will write.
EXPLANATION_GUESS = "the word 'the' at the start of a clause, mostly in news and encyclopedic text"

Counter = Callable[[str], int]
MessagesCounter = Callable[[Sequence[dict[str, str]]], int]


def approx_tokens(text: str) -> int:
    """About 4 characters per token: the usual rule of thumb for BPE tokenizers on English."""
    return math.ceil(len(text) / 4)


def tokenizer_counter(tokenizer: Any) -> Counter:
    """``count_tokens`` from a transformers tokenizer (no special tokens added)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def template_counter(tokenizer: Any) -> MessagesCounter | None:
    """Tokens of a whole request as the tokenizer's chat template writes it (with the
    assistant's turn opened), or None when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def count(messages: Sequence[dict[str, str]]) -> int:
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(ids, "keys"):  # a BatchEncoding in some transformers versions
            ids = ids["input_ids"]
        return len(ids)

    return count


@dataclass
class Estimate:
    features: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    completion_max: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_tokens": self.total_tokens}

    def line(self) -> str:
        return (f"{self.requests:,} requests for {self.features:,} features, about "
                f"{self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion tokens "
                f"({self.total_tokens:,} in all; completions at most {self.completion_max:,} if "
                "every reply runs to max_tokens)")


def message_tokens(messages: Sequence[dict[str, str]], count: Counter, per_message: int,
                   per_request: int) -> int:
    return sum(count(m["content"]) + per_message for m in messages) + per_request


def estimate_feature(sets: ExampleSets, feature: int, *, count: Counter, seed: int = 0,
                     batch: int = 5, scorers: Sequence[str] = SCORERS, per_message: int = 4,
                     per_request: int = 3, count_messages: MessagesCounter | None = None,
                     explain_max_tokens: int = 60) -> Estimate:
    """The requests and tokens one feature will cost (the module docstring says how)."""
    def prompt(msgs: Sequence[dict[str, str]]) -> int:
        if count_messages is not None:
            return count_messages(msgs)
        return message_tokens(msgs, count, per_message, per_request)

    est = Estimate(features=1)
    if not sets.explain:
        return est
    est.requests += 1
    est.prompt_tokens += prompt(explainer_messages(sets.explain))
    est.completion_tokens += count(EXPLANATION_GUESS)
    est.completion_max += explain_max_tokens
    if not sets.non_activating:
        return est
    for kind in scorers:
        for g in batches(items_for(kind, sets, rng_for(seed, feature, kind)), batch):
            msgs = scorer_messages(kind, EXPLANATION_GUESS, [it.text for it in g], batch == 1)
            est.requests += 1
            est.prompt_tokens += prompt(msgs)
            est.completion_tokens += count(expected_answer(len(g), batch == 1))
            est.completion_max += MAX_TOKENS_PER_ITEM * batch  # the request's max_tokens
    return est


def add(a: Estimate, b: Estimate) -> Estimate:
    return Estimate(a.features + b.features, a.requests + b.requests,
                    a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens,
                    a.completion_max + b.completion_max)
