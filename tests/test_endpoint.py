"""ChatClient against the scripted fake endpoint: replies, usage, retries, timeouts, parsing."""

from __future__ import annotations

import threading
import time

import pytest

from llamascope_sdk.base.endpoint import (
    ChatClient,
    EndpointError,
    TokenBudgetExceeded,
    chat_url,
    retry_after_seconds,
)
from llamascope_sdk.base.errors import InputError
from tests.fake_endpoint import Delay, Drop, FakeEndpoint, Malformed, Status, count_words

USER = [{"role": "user", "content": "Name one colour, please."}]


def test_reply_and_usage_match_the_fake_count():
    with FakeEndpoint(reply=lambda m: "Blue is a colour.", lifetime=20) as fake:
        client = ChatClient(fake.url, "m")
        r = client.chat(USER)
    # by hand: "Name one colour , please ." = 6 words + 4 per message + 3 per request
    assert (r.text, r.prompt_tokens, r.completion_tokens) == ("Blue is a colour.", 13, 5)
    assert client.usage.as_dict() == {"requests": 1, "replies": 1, "retries": 0,
                                      "prompt_tokens": 13, "completion_tokens": 5,
                                      "missing_usage": 0, "unparsable": 0, "total_tokens": 18}
    assert fake.requests[0] == {"model": "m", "messages": USER, "temperature": 0.0}


def test_max_tokens_and_seed_are_sent():
    with FakeEndpoint(reply=lambda m: "one two three four five", lifetime=20) as fake:
        client = ChatClient(fake.url + "/chat/completions", "m", seed=7)
        r = client.chat(USER, max_tokens=2)
    assert fake.requests[0]["max_tokens"] == 2 and fake.requests[0]["seed"] == 7
    assert (r.text, r.completion_tokens) == ("one two", 2)


def test_429_and_5xx_are_retried_honouring_retry_after():
    script = [Status(429, retry_after="0.3"), Status(503), Status(500), "done"]
    with FakeEndpoint(script=script, lifetime=20) as fake:
        client = ChatClient(fake.url, "m", backoff=0.01)
        t0 = time.monotonic()
        r = client.chat(USER)
        took = time.monotonic() - t0
    assert r.text == "done"
    assert fake.statuses == [429, 503, 500, 200]
    assert (client.usage.requests, client.usage.retries, client.usage.replies) == (4, 3, 1)
    assert took >= 0.3  # waited what Retry-After asked, not the 0.01 s backoff
    assert took < 5


def test_backoff_grows_exponentially():
    script = [Status(500), Status(500), Status(500), "ok"]
    with FakeEndpoint(script=script, lifetime=20) as fake:
        client = ChatClient(fake.url, "m", backoff=0.1)
        t0 = time.monotonic()
        client.chat(USER)
        took = time.monotonic() - t0
    assert took >= 0.1 + 0.2 + 0.4  # 0.1 * 2**k for k = 0, 1, 2


def test_gives_up_after_max_retries_with_one_line():
    with FakeEndpoint(reply=lambda m: Status(502), lifetime=20) as fake:
        client = ChatClient(fake.url, "m", backoff=0.0, max_retries=2)
        with pytest.raises(EndpointError, match="no answer after 3 attempts .*HTTP 502"):
            client.chat(USER)
    assert fake.statuses == [502, 502, 502]


def test_other_http_errors_stop_at_once():
    with FakeEndpoint(model_name="right", lifetime=20) as fake:
        client = ChatClient(fake.url, "wrong", backoff=0.0)
        with pytest.raises(EndpointError, match="HTTP 404: .*model not found") as info:
            client.chat(USER)
    assert fake.statuses == [404]
    assert "model name" in (info.value.hint or "")


def test_timeout_then_retry_and_dropped_connection():
    script = [Delay(1.0, "late"), Drop(), "fine"]
    with FakeEndpoint(script=script, lifetime=20) as fake:
        client = ChatClient(fake.url, "m", timeout=0.3, backoff=0.0)
        r = client.chat(USER)
    assert r.text == "fine"
    assert client.usage.retries == 2 and client.usage.replies == 1


def test_unparsable_replies_are_counted_not_guessed():
    def parse(text: str) -> int:
        if text.strip() not in ("0", "1"):
            raise ValueError(text)
        return int(text)

    script = [Malformed(), Malformed(b'{"choices": []}'), "maybe", "1"]
    with FakeEndpoint(script=script, lifetime=20) as fake:
        client = ChatClient(fake.url, "m")
        replies = [client.chat(USER, parse=parse) for _ in range(4)]
    assert [r.value for r in replies] == [None, None, None, 1]
    assert [r.text for r in replies] == [None, None, "maybe", "1"]
    assert client.usage.unparsable == 3
    assert client.usage.missing_usage == 2  # the two malformed bodies carried no usage
    assert client.usage.retries == 0  # a bad reply is not resent: a deterministic server repeats it


def test_concurrency_is_bounded_and_order_kept():
    with FakeEndpoint(reply=lambda m: Delay(0.15, m[0]["content"]), lifetime=30) as fake:
        client = ChatClient(fake.url, "m", concurrency=3)
        convs = [[{"role": "user", "content": f"n{i}"}] for i in range(9)]
        t0 = time.monotonic()
        replies = client.map(convs)
        took = time.monotonic() - t0
        # several callers sharing one client still respect the bound
        threads = [threading.Thread(target=client.map, args=(convs[:4],)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    assert [r.text for r in replies] == [f"n{i}" for i in range(9)]
    assert fake.max_in_flight == 3
    assert took >= 3 * 0.15  # 9 requests, 3 at a time


def test_token_budget_stops_before_sending():
    with FakeEndpoint(reply=lambda m: "a b c", lifetime=20) as fake:
        client = ChatClient(fake.url, "m", token_budget=20)
        client.chat(USER)  # 13 + 3 = 16 tokens
        client.chat(USER)  # 32: over the budget after this one
        with pytest.raises(TokenBudgetExceeded, match="32 tokens were used, the budget is 20"):
            client.chat(USER)
    assert len(fake.requests) == 2


def test_bad_arguments_are_refused_before_sending():
    with pytest.raises(InputError, match="not an http"):
        chat_url("127.0.0.1:8000")
    with pytest.raises(InputError, match="concurrency"):
        ChatClient("http://127.0.0.1:9/v1", "m", concurrency=0)
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"


def test_retry_after_forms():
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_fake_stops_by_itself():
    fake = FakeEndpoint(lifetime=0.3).start()
    url = fake.url
    time.sleep(1.0)
    client = ChatClient(url, "m", max_retries=0, timeout=2)
    with pytest.raises(EndpointError):
        client.chat(USER)
    assert count_words("a, b") == 3
