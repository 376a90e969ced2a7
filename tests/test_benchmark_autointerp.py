"""SAEBench's autointerp score through the explain machinery, against the scripted fake
endpoint, with scores computed by hand from what the scorer was shown."""

from __future__ import annotations

import re

import torch

from llamascope_sdk.base.endpoint import ChatClient
from llamascope_sdk.benchmark import autointerp as AI
from tests.fake_endpoint import FakeEndpoint

N, T = 40, 48


def _text() -> tuple[list[list[str]], torch.Tensor]:
    """Rows of filler words; " cat" (activations 5.0..6.1) at 12 spread-out places and
    " kitten" (0.5..0.95) at 10 others; the feature is zero everywhere else."""
    g = torch.Generator().manual_seed(3)
    tokens = [[f" w{int(torch.randint(0, 50, (1,), generator=g))}" for _ in range(T)]
              for _ in range(N)]
    acts = torch.zeros(N, T)
    for i in range(12):
        tokens[i][24] = " cat"
        acts[i, 24] = 5.0 + 0.1 * i
    for i in range(10):
        tokens[12 + i][20] = " kitten"
        acts[12 + i, 20] = 0.5 + 0.05 * i
    return tokens, acts


def _excerpts(messages: list[dict[str, str]]) -> list[str]:
    return re.findall(r"^Example \d+: (.*)$", messages[-1]["content"], flags=re.M)


def _is_scorer(messages: list[dict[str, str]]) -> bool:
    return "list of 0s and 1s" in messages[0]["content"]


def _run(reply) -> tuple[AI.AutointerpResult, FakeEndpoint]:  # type: ignore[no-untyped-def]
    tokens, acts = _text()
    with FakeEndpoint(reply=reply) as fake:
        client = ChatClient(fake.url, "fake-model", max_retries=0)
        res = AI.autointerp(client, tokens, lambda ids: acts[..., None].expand(N, T, len(ids)),
                            alive=[0], n_features=1, seeds=[42])
    return res, fake


def _mentions(text: str) -> bool:
    return "cat" in text or "kitten" in text


def test_a_perfect_scorer_scores_one() -> None:
    def reply(messages):  # type: ignore[no-untyped-def]
        if _is_scorer(messages):
            return str([int(_mentions(t)) for t in _excerpts(messages)])
        return "cats and kittens"

    res, fake = _run(reply)
    (score,) = res.per_seed[0]
    assert score.explanation == "cats and kittens" and score.score == 1.0
    explain, scorer = fake.requests
    assert explain["messages"][-1]["content"].count("<< cat>>") == AI.N_TOP_GEN
    assert len(_excerpts(scorer["messages"])) == AI.N_TOP_SCORE + AI.N_IW_SCORE + AI.N_RANDOM
    assert res.score.mean == 1.0 and res.score.n == 1


def test_an_all_no_scorer_scores_the_inactive_share() -> None:
    """Every excerpt answered 0: correct exactly on the inactive ones. The number of active
    excerpts is counted here from the scorer's request (the feature fires on cat/kitten only)."""
    def reply(messages):  # type: ignore[no-untyped-def]
        if _is_scorer(messages):
            return str([0] * len(_excerpts(messages)))
        return "cats"

    res, fake = _run(reply)
    shown = _excerpts(fake.requests[1]["messages"])
    n_active = sum(_mentions(t) for t in shown)
    assert n_active >= AI.N_TOP_SCORE + AI.N_IW_SCORE  # the held-out top and sampled ones
    (score,) = res.per_seed[0]
    assert score.n_active == n_active
    assert score.score == (len(shown) - n_active) / len(shown)


def test_an_unparsable_reply_leaves_the_feature_out() -> None:
    def reply(messages):  # type: ignore[no-untyped-def]
        return "no idea" if _is_scorer(messages) else "cats"

    res, _ = _run(reply)
    assert res.per_seed[0][0].score is None and res.unparsable == 1


def test_excerpt_selection() -> None:
    _, acts = _text()
    top = AI.top_positions(acts, 12)
    assert sorted(r for r, _ in top) == list(range(12))  # the 12 cats, strongest first
    assert top[0] == (11, 24)
    g = torch.Generator().manual_seed(0)
    iw = AI.sampled_positions(acts, below=5.0, k=7, g=g)
    assert len(set(iw)) == 7 and all(12 <= r < 22 and p == 20 for r, p in iw)  # kittens only
    sets = AI.feature_sets(*_text(), seed=1)
    assert sets is not None and len(sets.explain) == 15 and len(sets.score) == 14
    maxes = [max(c.acts) for c in sets.explain]
    assert maxes == sorted(maxes, reverse=True)
