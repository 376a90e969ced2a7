"""Issue 27, item 6: a reply that is not the protocol is a transport error, never an
unparsable model reply: retried, then an EndpointError (the feature stays not done and a
re-run tries it again); replies are capped in size."""

from __future__ import annotations

import pytest

from llamascope_sdk.base.endpoint import ChatClient, EndpointError
from tests.fake_endpoint import FakeEndpoint, Malformed

USER = [{"role": "user", "content": "Say 1."}]
HTML = b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"


def completion(content: str) -> bytes:
    return (b'{"choices": [{"message": {"role": "assistant", "content": "' + content.encode()
            + b'"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, '
            b'"completion_tokens": 1}}')


@pytest.mark.parametrize("body", [
    HTML,                                                  # a proxy's error page
    b"",                                                   # an empty body
    b'{"choices": [ {"message": ',                         # truncated JSON
    b'{"nope": 1}',                                        # JSON, not a chat completion
    b'{"choices": []}',                                    # no choice
    b'{"choices": [{"text": "1"}]}',                       # a completions reply, no message
    b'{"choices": [{"message": {"content": 7}}]}',         # content not a string
    b'[1, 2]',                                             # not an object
])
def test_non_protocol_200_is_retried_then_recovers(body):
    with FakeEndpoint(script=[Malformed(body)], reply=lambda m: "1", lifetime=20) as fake:
        client = ChatClient(fake.url, "m", backoff=0.0)
        r = client.chat(USER, parse=int)
    assert (r.text, r.value) == ("1", 1)
    assert fake.statuses == [200, 200]
    u = client.usage
    assert (u.requests, u.retries, u.replies, u.unparsable, u.malformed) == (2, 1, 1, 0, 1)


def test_non_protocol_every_time_is_an_endpoint_error_in_one_line():
    with FakeEndpoint(reply=lambda m: Malformed(HTML), lifetime=20) as fake:
        client = ChatClient(fake.url, "m", backoff=0.0, max_retries=2)
        with pytest.raises(EndpointError) as info:
            client.chat(USER, parse=int)
    msg = str(info.value)
    assert msg == (f"{client.url}: no chat completion after 3 attempts (last: HTTP 200 with a "
                   "body that is not a chat completion: not JSON, starts "
                   "'<html><body><h1>502 Bad Gateway</h1>nginx</body></html>')")
    assert fake.statuses == [200, 200, 200] and client.usage.unparsable == 0


def test_a_well_formed_reply_that_does_not_parse_is_unparsable_and_not_resent():
    with FakeEndpoint(script=[Malformed(completion("maybe"))], lifetime=20) as fake:
        client = ChatClient(fake.url, "m", backoff=0.0)
        r = client.chat(USER, parse=int)
    assert (r.text, r.value) == ("maybe", None)
    assert fake.statuses == [200]
    assert (client.usage.unparsable, client.usage.malformed, client.usage.retries) == (1, 0, 0)


def test_a_null_content_is_the_model_saying_nothing():
    body = b'{"choices": [{"message": {"role": "assistant", "content": null}}]}'
    with FakeEndpoint(script=[Malformed(body)], lifetime=20) as fake:
        client = ChatClient(fake.url, "m", backoff=0.0)
        r = client.chat(USER, parse=int)
    assert (r.text, r.value, client.usage.unparsable, client.usage.retries) == (None, None, 1, 0)


def test_a_reply_larger_than_the_cap_is_refused_not_stored():
    big = completion("x" * (3 * 2**20))  # a 3 MiB reply (the server ignored max_tokens)
    with FakeEndpoint(reply=lambda m: Malformed(big), lifetime=20) as fake:
        client = ChatClient(fake.url, "m", backoff=0.0, max_retries=1, max_reply_bytes=2**20)
        with pytest.raises(EndpointError) as info:
            client.chat(USER)
    assert str(info.value) == (f"{client.url}: no chat completion after 2 attempts (last: HTTP "
                               "200 with a body larger than the 1,048,576-byte cap "
                               "(max_reply_bytes))")
    assert len(fake.statuses) == 2
