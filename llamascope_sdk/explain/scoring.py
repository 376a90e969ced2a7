"""Detection and fuzzing scores of an explanation (delphi, Paulo et al. arXiv 2410.13928).

Both run on contexts held out from the explainer (:func:`~.examples.example_sets`):

* **detection**: the scorer reads the explanation and plain excerpts (no marks) and says for
  each whether the feature fires in it. Positives: the held-out activating contexts;
  negatives: the non-activating contexts.
* **fuzzing**: the scorer reads excerpts with marked tokens and says whether the marks are
  where the explanation applies. Positives: the held-out activating contexts with the tokens
  the feature fired on marked; negatives: the non-activating contexts, each marked at the
  positions of a randomly chosen activating context (delphi's default fuzzing).

The items of one scorer are shuffled with a generator seeded by (seed, feature, scorer) and
sent ``batch`` per request (5 by default). The score is the balanced accuracy over the items
whose batch reply parsed: ``(TP / (TP + FN) + TN / (TN + FP)) / 2``, so chance is 0.5 whatever
the class balance. A batch whose reply does not parse is left out and counted
(``unparsable_batches``); with no parsed positive or no parsed negative the score is None.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from llamascope_sdk.base.endpoint import ChatClient
from llamascope_sdk.explain.examples import ExampleSets
from llamascope_sdk.explain.prompts import marked, parse_labels, plain, scorer_messages

#: max_tokens of a scorer request, per excerpt in it
MAX_TOKENS_PER_ITEM = 8

SCORERS = ("detection", "fuzzing")


@dataclass(frozen=True)
class Item:
    """One excerpt shown to a scorer; ``label`` 1 for activating (or correctly marked)."""

    text: str
    label: int


def rng_for(seed: int, feature: int, kind: str) -> random.Random:
    return random.Random(f"{seed}:{feature}:{kind}")  # str seeds are hashed deterministically


def items_for(kind: str, sets: ExampleSets, rng: random.Random) -> list[Item]:
    """The scorer's items, shuffled by ``rng``."""
    if kind == "detection":
        items = ([Item(plain(c), 1) for c in sets.activating]
                 + [Item(plain(c), 0) for c in sets.non_activating])
    elif kind == "fuzzing":
        fired = [[k for k, a in enumerate(c.acts) if a > 0] for c in sets.activating]
        items = [Item(marked(c), 1) for c in sets.activating]
        for c in sets.non_activating:
            where = rng.choice(fired) if fired else []
            items.append(Item(marked(c, [k for k in where if k < len(c.tokens)]), 0))
    else:
        raise ValueError(f"unknown scorer {kind!r}; allowed: {', '.join(SCORERS)}")
    rng.shuffle(items)
    return items


def batches(items: Sequence[Item], size: int) -> list[list[Item]]:
    return [list(items[k:k + size]) for k in range(0, len(items), size)]


def balanced_accuracy(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, Any]:
    """Confusion counts and balanced accuracy (None without a positive or a negative)."""
    pairs = list(zip(labels, predictions, strict=True))
    tp = sum(1 for y, p in pairs if y == 1 and p == 1)
    fn = sum(1 for y, p in pairs if y == 1 and p == 0)
    tn = sum(1 for y, p in pairs if y == 0 and p == 0)
    fp = sum(1 for y, p in pairs if y == 0 and p == 1)
    score = None
    if tp + fn and tn + fp:
        score = (tp / (tp + fn) + tn / (tn + fp)) / 2
    return {"balanced_accuracy": score, "tp": tp, "fn": fn, "tn": tn, "fp": fp}


def score(client: ChatClient, kind: str, explanation: str, sets: ExampleSets, *,
          feature: int, seed: int = 0, batch: int = 5) -> dict[str, Any]:
    """Run one scorer for one explanation; the result is JSON-ready."""
    groups = batches(items_for(kind, sets, rng_for(seed, feature, kind)), batch)
    single = batch == 1  # one yes/no question per excerpt
    convs = [scorer_messages(kind, explanation, [it.text for it in g], single) for g in groups]
    parsers = [partial(parse_labels, n=len(g), single=single) for g in groups]
    replies = client.map(convs, max_tokens=MAX_TOKENS_PER_ITEM * batch, parse=parsers)
    labels: list[int] = []
    preds: list[int] = []
    bad = 0
    for g, r in zip(groups, replies, strict=True):
        if r.value is None:
            bad += 1
            continue
        labels += [it.label for it in g]
        preds += list(r.value)
    return {**balanced_accuracy(labels, preds), "n_items": sum(len(g) for g in groups),
            "n_scored": len(labels), "requests": len(groups), "unparsable_batches": bad,
            "replies": [r.text for r in replies],
            "prompt_tokens": sum(r.prompt_tokens for r in replies),
            "completion_tokens": sum(r.completion_tokens for r in replies)}
