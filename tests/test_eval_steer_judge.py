"""The AxBench judge against the scripted fake endpoint on 127.0.0.1: exact scores on
constructed replies, malformed replies counted (never guessed), 429 then success, timeouts."""

from __future__ import annotations

import time

import pytest

from llamascope_sdk.base.endpoint import ChatClient, EndpointError
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.evaluation.judge import Judge, harmonic_mean, make_judge, parse_rating
from tests.fake_endpoint import Delay, FakeEndpoint, Malformed, Status


def _by_question(messages) -> str:
    """A fake judge: concept 2, instruction 1, fluency 2 (from the rubric line it was sent)."""
    text = messages[-1]["content"]
    if text.startswith("Judge whether the concept"):
        return "It is clearly about the sea. Rating: [[2]]"
    if text.startswith("Judge whether the text fragment is a relevant"):
        return "Partly on topic. Rating: [[1]]"
    return "Reads well.\nRating: [[2]]"


def test_parse_and_harmonic_mean():
    assert parse_rating("reason... Rating: [[0]]") == 0.0
    assert parse_rating("Rating: [[1]] then Rating: [[ 2 ]]") == 2.0
    for bad in ("Rating: 2", "Rating: [[3]]", "", None, "[[2]]"):
        with pytest.raises(ValueError):
            parse_rating(bad)
    assert harmonic_mean([2, 1, 2]) == pytest.approx(3 / (1 / 2 + 1 + 1 / 2))
    assert harmonic_mean([2, 0, 2]) == 0.0
    assert harmonic_mean([2, None, 2]) is None


def test_exact_scores_on_constructed_replies():
    with FakeEndpoint(reply=_by_question, lifetime=60) as fake:
        judge = make_judge(fake.url, "fake-judge", concurrency=3)
        got = judge([("The sea is", "blue and deep", "the sea"), ("A", "b", "c")])
    assert got == [pytest.approx(1.5), pytest.approx(1.5)]  # 3 / (1/2 + 1/1 + 1/2)
    assert len(fake.requests) == 6 and fake.max_in_flight <= 3
    assert all(r["model"] == "fake-judge" and r["temperature"] == 0.0 for r in fake.requests)
    rep = judge.report()
    assert rep["items"] == 2 and rep["unparsable"] == 0 and rep["requests"] == 6


def test_malformed_replies_are_counted_not_guessed():
    # the first item's three questions: a reply without a rating, a body that is no chat
    # completion, then a good one; the second item is answered normally
    script = ["I think it is fine.", Malformed(b'{"nope": 1}'), "Rating: [[2]]"]
    with FakeEndpoint(reply=_by_question, script=script, lifetime=60) as fake:
        judge = make_judge(fake.url, "m", concurrency=1)
        got = judge([("p", "t", "c"), ("p2", "t2", "c2")])
    assert got[0] is None and got[1] == pytest.approx(1.5)
    assert judge.report()["unparsable"] == 2


def test_429_then_success():
    with FakeEndpoint(reply=_by_question, script=[Status(429, retry_after="0"), Status(503)],
                      lifetime=60) as fake:
        client = ChatClient(fake.url, "m", concurrency=1, backoff=0.01, max_retries=3,
                            temperature=0.0)
        got = Judge(client)([("p", "t", "c")])
    assert got == [pytest.approx(1.5)]
    assert fake.statuses[:2] == [429, 503] and client.usage.retries == 2


def test_timeout_is_retried_then_reported():
    with FakeEndpoint(reply=lambda m: Delay(2.0, "Rating: [[2]]"), lifetime=60) as fake:
        client = ChatClient(fake.url, "m", concurrency=1, timeout=0.3, backoff=0.01,
                            max_retries=1, temperature=0.0)
        t0 = time.monotonic()
        with pytest.raises(EndpointError, match="attempts"):
            Judge(client)([("p", "t", "c")])
        assert time.monotonic() - t0 < 10
    with FakeEndpoint(reply=_by_question, script=[Delay(2.0, "late")], lifetime=60) as fake:
        client = ChatClient(fake.url, "m", concurrency=1, timeout=0.5, backoff=0.01,
                            max_retries=2, temperature=0.0)
        assert Judge(client)([("p", "t", "c")]) == [pytest.approx(1.5)]


def test_key_env_must_be_set(monkeypatch):
    monkeypatch.delenv("STEER_JUDGE_KEY", raising=False)
    with pytest.raises(InputError, match="STEER_JUDGE_KEY"):
        make_judge("http://127.0.0.1:9/v1", "m", key_env="STEER_JUDGE_KEY")


@pytest.mark.smollm
@pytest.mark.slow
def test_end_to_end_with_llamascope_serve_as_judge(smollm2, tmp_path, monkeypatch):
    """Plumbing, not quality: eval_steer's judge calls a real `llamascope serve` running
    SmolLM2-135M-Instruct; every continuation is asked three questions, and what the small
    model answers is parsed or counted as unparsable."""
    import math

    from llamascope_sdk import SAE
    from llamascope_sdk.evaluation.steer_eval import eval_steer
    from tests.serve_helpers import KEY, MODEL_ID, running_server

    model, tok = smollm2
    sae = SAE.from_pretrained("demo")
    monkeypatch.setenv("STEER_TEST_JUDGE_KEY", KEY)
    prompts = ["The sea is", "My city has", "The book was", "Rain falls"]
    with running_server(model, tok, tmp_path) as srv:
        judge = make_judge(srv.url + "/v1", MODEL_ID, key_env="STEER_TEST_JUDGE_KEY",
                           concurrency=2, max_tokens=12)
        res = eval_steer(model, tok, sae, [4154], strengths=[0, 40], prompts=prompts,
                         max_new_tokens=4, baselines=False, judge=judge, progress=False)
    rep = judge.report()
    # (unsteered + strength 40) x 4 prompts continuations, three questions each
    assert rep["items"] == 8 and rep["requests"] == 24 and rep["replies"] == 24
    assert rep["completion_tokens"] > 0 and 0 <= rep["unparsable"] <= 24
    for p in res[0].curves["feature"]:
        assert p.judge is None or math.isnan(p.judge) or 0 <= p.judge <= 2
