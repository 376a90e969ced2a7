"""Issue 26 item 6 for serve: a reply is decoded incrementally (not again whole at each token),
its pieces equal the whole decode, stop strings are found where a whole-text search finds them;
the scheduler raises its own errors, which the HTTP layer maps."""

from __future__ import annotations

import random
import threading

import pytest

from llamascope_sdk.serve.decoding import ReplyText
from llamascope_sdk.serve.errors import QueueFullError, ShuttingDownError, http_error
from llamascope_sdk.serve.payloads import first_stop
from llamascope_sdk.serve.scheduler import Job, Scheduler
from tests.serve_tiny import smollm2_tokenizer

TEXTS = ["Héllo wörld — ünïcode 🎉 test. New\nline  spaces 日本語のテキスト and more emoji 🧪🧬.",
         "def f(x):\n    return x ** 2  # a comment\n\n" * 20]


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


class Counting:
    """A tokenizer whose ``decode`` counts the tokens it is given."""

    def __init__(self, tok) -> None:
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


def _feed(tok, ids, stops=None) -> tuple[ReplyText, list[str]]:
    reply = ReplyText(tok, stops)
    return reply, [reply.add(t, final=i == len(ids) - 1) for i, t in enumerate(ids)]


def test_pieces_equal_the_whole_decode(tok) -> None:
    rng = random.Random(0)
    cases = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    cases += [[rng.randrange(len(tok)) for _ in range(80)] for _ in range(20)]  # specials too
    for ids in cases:
        reply, pieces = _feed(tok, ids)
        whole = tok.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == reply.text == whole


def test_a_half_character_waits_for_the_rest(tok) -> None:
    ids = tok("🎉", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # the emoji's bytes span several tokens
    reply, pieces = _feed(tok, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🎉"


def test_decoding_is_linear_in_the_reply(tok) -> None:
    ids = tok(TEXTS[1], add_special_tokens=False)["input_ids"]
    counting = Counting(tok)
    _feed(counting, ids)
    n = len(ids)
    assert n > 200
    # each token is decoded in a window of a few tokens: about 3n in all (re-decoding the
    # whole reply at each token, as before, is n(n+1)/2)
    assert counting.decoded <= 4 * n, (counting.decoded, n)


def test_stop_strings_found_where_the_whole_text_has_them(tok) -> None:
    text = TEXTS[1]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    whole = tok.decode(ids, skip_special_tokens=True)
    for stops in (["return"], ["\n\n"], [" ** 2  #", "x):"], ["never there"], ["🧪"]):
        reply, _ = _feed(tok, ids, stops)
        assert reply.stop_at == first_stop(whole, stops)
        assert reply.reply == whole[:first_stop(whole, stops)]


def test_scheduler_raises_its_own_errors_and_the_http_layer_maps_them(tiny_llama,
                                                                      char_tokenizer) -> None:
    import asyncio

    sched = Scheduler(tiny_llama, char_tokenizer, max_batch=2, max_queue=1)
    loop = asyncio.new_event_loop()
    gate = threading.Event()
    try:
        fut = sched.call(lambda: gate.wait(60))  # hold the thread: jobs wait
        sched.submit(Job([], loop))
        with pytest.raises(QueueFullError) as info:
            sched.submit(Job([], loop))
        err = http_error(info.value)
        assert (err.status, err.headers, err.message) == (
            429, {"Retry-After": "1"}, "the queue is full (1 requests waiting); retry later")
        gate.set()
        fut.result(60)
        sched.stop(60)
        with pytest.raises(ShuttingDownError) as info2:
            sched.submit(Job([], loop))
        assert http_error(info2.value).status == 503
    finally:
        gate.set()
        sched.stop(60)
        loop.close()
    with pytest.raises(ValueError, match="max_queue must be at least 1"):
        Scheduler(tiny_llama, char_tokenizer, max_queue=0)
