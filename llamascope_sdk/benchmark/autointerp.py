"""SAEBench's autointerp score (Paulo et al.; Bills et al. 2023) through ``llamascope
explain``'s machinery, against any OpenAI-compatible endpoint (``llamascope serve``, vLLM,
OpenAI, ...): the SDK's :class:`~llamascope_sdk.base.endpoint.ChatClient`, its excerpts
(:class:`~llamascope_sdk.explain.examples.Context`) and its explainer and detection prompts.

Protocol (SAEBench ``evals/autointerp``, defaults): features are drawn at random among those
that fire on the text; activations are read on rows of ``context`` tokens, special tokens
masked. Per feature:

* **excerpts** of 2 x 10 + 1 tokens around a position (``buffer`` = 10, centre away from the
  row ends): the 12 top-activating positions (greedy, non-overlapping excerpts), 7 positions
  sampled with probability proportional to the activation among those below the smallest
  top value (importance-weighted), and 10 uniformly random positions;
* the 12 top excerpts are split at random 10 / 2 and the 7 sampled ones 5 / 2: the first
  parts (15 excerpts, strongest first) go to the **explainer**; the second parts plus the 10
  random ones (14 excerpts, shuffled) to the **scorer**;
* a scoring excerpt is *active* when any of its tokens exceeds 1% of the largest top value;
* the scorer gets the explanation and the 14 plain excerpts in one request and says which are
  active; the **score** is the fraction of the 14 it classified correctly (active and
  inactive alike, as SAEBench counts), and the SAE's score the mean over features.

A reply that does not parse leaves its feature out (counted in ``unparsable``). Differences
from SAEBench, stated: the wording of both prompts is the SDK's (``llamascope explain``'s
explainer prompt and its detection scorer, which answers with a 0/1 list rather than the
indices of the active excerpts), so scores follow the protocol but are not bit-identical to
SAEBench's with gpt-4o-mini; the spread is over reseeds, each drawing other features and
other random and sampled excerpts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llamascope_sdk.base.endpoint import ChatClient
from llamascope_sdk.benchmark.spread import Spread, spread
from llamascope_sdk.explain.examples import Context
from llamascope_sdk.explain.prompts import (
    explainer_messages,
    parse_explanation,
    parse_labels,
    plain,
    scorer_messages,
)

BUFFER = 10
N_TOP_GEN, N_TOP_SCORE = 10, 2
N_IW_GEN, N_IW_SCORE = 5, 2
N_RANDOM = 10
ACTIVE_FRACTION = 0.01


@dataclass(frozen=True)
class Excerpt:
    """One scoring or explaining excerpt: its tokens, activations and whether it is active."""

    context: Context
    active: bool


def _window(tokens: Sequence[Sequence[str]], acts_NT: torch.Tensor, row: int, pos: int) -> Context:
    lo, hi = pos - BUFFER, pos + BUFFER + 1
    return Context(tuple(tokens[row][lo:hi]), tuple(float(a) for a in acts_NT[row, lo:hi]),
                   row, lo)


def top_positions(acts_NT: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The k largest activations whose excerpts do not overlap (greedy, largest first)."""
    inner = acts_NT[:, BUFFER:acts_NT.shape[1] - BUFFER]
    flat = inner.flatten()
    out: list[tuple[int, int]] = []
    for idx in torch.argsort(flat, descending=True).tolist():
        if flat[idx] <= 0 or len(out) == k:
            break
        row, pos = divmod(idx, inner.shape[1])
        pos += BUFFER
        if all(r != row or abs(p - pos) > 2 * BUFFER for r, p in out):
            out.append((row, pos))
    return out


def sampled_positions(acts_NT: torch.Tensor, below: float, k: int,
                      g: torch.Generator) -> list[tuple[int, int]]:
    """k positions drawn with probability proportional to the activation, among those below
    ``below`` (so disjoint from the top excerpts); fewer when fewer are non-zero."""
    inner = acts_NT[:, BUFFER:acts_NT.shape[1] - BUFFER].clamp(min=0)
    w = torch.where(inner >= below, 0.0, inner).flatten().double()
    n = min(k, int((w > 0).sum()))
    if n == 0:
        return []
    picks = torch.multinomial(w, n, replacement=False, generator=g).tolist()
    return [(i // inner.shape[1], i % inner.shape[1] + BUFFER) for i in picks]


def random_positions(shape: tuple[int, int], k: int, g: torch.Generator) -> list[tuple[int, int]]:
    rows = torch.randint(0, shape[0], (k,), generator=g).tolist()
    pos = torch.randint(BUFFER, shape[1] - BUFFER, (k,), generator=g).tolist()
    return list(zip(rows, pos, strict=True))


@dataclass
class FeatureSets:
    explain: list[Context]
    score: list[Excerpt]


def feature_sets(tokens: Sequence[Sequence[str]], acts_NT: torch.Tensor,
                 seed: int) -> FeatureSets | None:
    """The explainer's and the scorer's excerpts of one feature; None when it has too few
    activations for the protocol (SAEBench skips it too)."""
    g = torch.Generator().manual_seed(seed)
    top = top_positions(acts_NT, N_TOP_GEN + N_TOP_SCORE)
    if len(top) < N_TOP_GEN + N_TOP_SCORE:
        return None
    threshold = ACTIVE_FRACTION * float(acts_NT[top[0]])
    below = min(float(acts_NT[r, p]) for r, p in top)
    iw = sampled_positions(acts_NT, below, N_IW_GEN + N_IW_SCORE, g)
    if len(iw) < N_IW_GEN + N_IW_SCORE:
        return None
    rand = random_positions((acts_NT.shape[0], acts_NT.shape[1]), N_RANDOM, g)
    t_perm, i_perm = torch.randperm(len(top), generator=g), torch.randperm(len(iw), generator=g)

    def ex(pos: tuple[int, int]) -> Excerpt:
        c = _window(tokens, acts_NT, *pos)
        return Excerpt(c, any(a > threshold for a in c.acts))

    gen = [ex(top[i]) for i in t_perm[:N_TOP_GEN]] + [ex(iw[i]) for i in i_perm[:N_IW_GEN]]
    score = ([ex(top[i]) for i in t_perm[N_TOP_GEN:]] + [ex(iw[i]) for i in i_perm[N_IW_GEN:]]
             + [ex(p) for p in rand])
    random.Random(seed).shuffle(score)
    gen.sort(key=lambda e: -max(e.context.acts))
    return FeatureSets([e.context for e in gen], score)


def accuracy(predicted: Sequence[int], excerpts: Sequence[Excerpt]) -> float:
    """SAEBench's score: the fraction of excerpts classified correctly."""
    return sum(int(p == int(e.active)) for p, e in zip(predicted, excerpts, strict=True)) / len(excerpts)


@dataclass
class FeatureScore:
    feature: int
    explanation: str | None
    score: float | None
    n_active: int
    reply: str | None = None


def score_feature(client: ChatClient, feature: int, sets: FeatureSets) -> FeatureScore:
    """One explainer request, then one scorer request with all scoring excerpts."""
    rep = client.chat(explainer_messages(sets.explain), max_tokens=60, parse=parse_explanation)
    n_active = sum(e.active for e in sets.score)
    if rep.value is None:
        return FeatureScore(feature, None, None, n_active, rep.text)
    n = len(sets.score)
    msgs = scorer_messages("detection", rep.value, [plain(e.context) for e in sets.score])
    out = client.chat(msgs, max_tokens=8 * n, parse=lambda t: parse_labels(t, n))
    if out.value is None:
        return FeatureScore(feature, rep.value, None, n_active, out.text)
    return FeatureScore(feature, rep.value, accuracy(out.value, sets.score), n_active, out.text)


@dataclass
class AutointerpResult:
    score: Spread
    per_seed: list[list[FeatureScore]] = field(default_factory=list)
    unparsable: int = 0


def autointerp(client: ChatClient, tokens: Sequence[Sequence[str]],
               feature_acts: Callable[[list[int]], torch.Tensor], alive: Sequence[int], *,
               n_features: int, seeds: Sequence[int]) -> AutointerpResult:
    """The score of one SAE. ``tokens``: the text's rows as token strings; ``feature_acts(ids)``
    gives the activations [N, T, len(ids)] of those features on the rows (specials zeroed);
    ``alive``: the features that fired, among which ``n_features`` are drawn per seed."""
    per: list[list[FeatureScore]] = []
    for seed in seeds:
        chosen = sorted(random.Random(seed).sample(list(alive), min(n_features, len(alive))))
        acts = feature_acts(chosen)
        row: list[FeatureScore] = []
        for j, f in enumerate(chosen):
            sets = feature_sets(tokens, acts[..., j], seed * 1_000_003 + f)
            if sets is not None:
                row.append(score_feature(client, f, sets))
        per.append(row)
    means = [_mean([s.score for s in row if s.score is not None]) for row in per]
    bad = sum(1 for row in per for s in row if s.score is None)
    return AutointerpResult(spread(means), per, bad)


def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def token_strings(tokenizer: Any, ids_NT: torch.Tensor) -> list[list[str]]:
    """Each id decoded on its own (what the excerpts show)."""
    cache: dict[int, str] = {}
    out = []
    for row in ids_NT.tolist():
        out.append([cache.setdefault(i, tokenizer.decode([i])) for i in row])
    return out


__all__ = ["AutointerpResult", "Excerpt", "FeatureScore", "FeatureSets", "accuracy",
           "autointerp", "feature_sets", "random_positions", "sampled_positions",
           "score_feature", "token_strings", "top_positions"]
