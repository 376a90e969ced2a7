"""`llamascope serve` with the real openai client against the real server on 127.0.0.1:
chat and completions, streamed and not, with and without steering; batched requests give the
tokens of single runs and of compare_generations; the load test."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from llamascope_sdk import SAE, Ablate, Clamp, Scale, Steer, compare_generations
from llamascope_sdk.loading import demo
from tests.serve_helpers import KEY, MODEL_ID, running_server, scheduler_paused, wait_for

pytestmark = pytest.mark.smollm

PROMPT = demo.DEMO_PROMPT
N = 10


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory):
    model, tok = smollm2
    with running_server(model, tok, tmp_path_factory.mktemp("serve") / "L5R") as s:
        yield s


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    with OpenAI(base_url=f"{served.url}/v1", api_key=KEY, timeout=300, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def saes(served):
    return SAE.from_pretrained(demo.DEMO_SAE_DIR), SAE.from_pretrained(served.layer5)


def _ivs(spec: list[dict], saes, chat: bool = False) -> list:
    """The library interventions a request's steering list means (independently written)."""
    out = []
    for e in spec:
        sae = saes[0] if e["sae"] == "demo" else saes[1]
        pos = e.get("positions", "generated" if chat else "all")
        kind = {"add": Steer, "clamp": Clamp, "scale": Scale}.get(e.get("mode", "add"))
        out.append(Ablate(sae, e["feature"], positions=pos) if kind is None else
                   kind(sae, e["feature"], e["value"], positions=pos))
    return out


def test_models_and_health(served, client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    import httpx

    h = httpx.get(f"{served.url}/health", timeout=30).json()
    assert h["status"] == "ok" and h["model"] == MODEL_ID


def test_completion_with_steering_and_baseline_equals_compare_generations(client, smollm2, saes) -> None:
    model, tok = smollm2
    steering = [{"sae": "demo", "feature": 4154, "value": 80.0}]
    r = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=N,
                                  extra_body={"steering": steering, "return_baseline": True})
    want = compare_generations(model, tok, PROMPT, _ivs(steering, saes), max_new_tokens=N)
    assert r.choices[0].text == want.steered
    assert r.steering["baseline"]["text"] == want.baseline != want.steered
    from llamascope_sdk.steering.generation import describe

    assert r.steering["applied"] == [f"demo: {describe(_ivs(steering, saes)[0])}"]
    assert "a vector of length +80 along its unit decoder direction (0.48 x" in r.steering["applied"][0]
    assert r.usage.completion_tokens == N and r.choices[0].finish_reason == "length"


def test_chat_plain_and_steered_and_streams_concatenate(client, smollm2, saes) -> None:
    model, tok = smollm2
    msg = [{"role": "user", "content": "Tell me about the sea."}]
    plain = client.chat.completions.create(model=MODEL_ID, messages=msg, max_tokens=N)
    steering = [{"sae": "demo", "feature": 1297, "value": 120.0}]
    steered = client.chat.completions.create(model=MODEL_ID, messages=msg, max_tokens=N,
                                             extra_body={"steering": steering})
    want = compare_generations(model, tok, msg[0]["content"], _ivs(steering, saes, chat=True),
                               max_new_tokens=N, chat=True)
    assert plain.choices[0].message.content == want.baseline
    assert steered.choices[0].message.content == want.steered != want.baseline
    assert "positions=generated" in steered.steering["applied"][0]
    for body, text in ((None, want.baseline), ({"steering": steering}, want.steered)):
        chunks = list(client.chat.completions.create(model=MODEL_ID, messages=msg, max_tokens=N,
                                                     stream=True, extra_body=body))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
        assert chunks[-1].choices[0].finish_reason == "length"
        chunks = list(client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=N,
                                                stream=True, extra_body=body))
        full = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=N,
                                         extra_body=body).choices[0].text
        assert "".join(c.choices[0].text for c in chunks) == full


EIGHT = [
    [{"sae": "demo", "feature": 4154, "value": 80.0}],
    [{"sae": "demo", "feature": 1297, "mode": "clamp", "value": 60.0}],
    [{"sae": "demo", "feature": [4154, 1062], "mode": "ablate"}],
    [{"sae": "demo", "feature": 1062, "mode": "scale", "value": 4.0, "positions": "prompt"}],
    [{"sae": "L5", "feature": 7, "value": 30.0, "positions": "generated"}],
    [{"sae": "L5", "feature": [1, 2, 3], "mode": "clamp", "value": 5.0}],
    [{"sae": "L5", "feature": 11, "mode": "scale", "value": 0.0},
     {"sae": "demo", "feature": 4154, "value": -40.0}],
    [],
]
PROMPTS = [PROMPT, "Once upon a time", "The sea is", "My favourite food is", "In 1999,",
           "Dear friend,", "The best way to learn is", "Hello"]


def _body(served, i: int, edits: list[dict]) -> dict:
    steering = [{**e, "sae": served.layer5 if e["sae"] == "L5" else e["sae"]} for e in edits]
    return {"model": MODEL_ID, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": N,
            "steering": steering}


def _post(served, body: dict) -> dict:
    import httpx

    r = httpx.post(f"{served.url}/v1/completions", json=body, timeout=300,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


def test_eight_concurrent_edits_equal_one_at_a_time_and_compare_generations(served, smollm2, saes) -> None:
    """Item 3: 8 requests with 8 different edits (add, clamp, scale, ablate; two SAEs at layers
    15 and 5) admitted in one batch == the same requests one at a time == compare_generations."""
    model, tok = smollm2
    bodies = [_body(served, i, e) for i, e in enumerate(EIGHT)]
    for b in bodies:  # load the SAEs first, so that all 8 wait in the queue together
        _post(served, {**b, "max_tokens": 1})
    before = served.scheduler.max_rows_seen = 0
    with ThreadPoolExecutor(8) as ex, scheduler_paused(served.scheduler):
        futs = [ex.submit(_post, served, b) for b in bodies]
        wait_for(lambda: served.scheduler.load["waiting"] == 8)
    together = [f.result(timeout=600)["choices"][0]["text"] for f in futs]
    assert served.scheduler.max_rows_seen == 8 > before
    alone = [_post(served, b)["choices"][0]["text"] for b in bodies]
    assert together == alone
    for i, e in enumerate(EIGHT):
        want = compare_generations(model, tok, PROMPTS[i], _ivs(e, saes), max_new_tokens=N)
        assert together[i] == want.steered, (i, e)
    assert len({t for t in together}) >= 6  # the edits really differ


@pytest.mark.slow
def test_load_64_requests_from_16_clients_none_lost(served, smollm2, saes) -> None:
    """64 requests, 16 concurrent clients, random mixes of edits: every answer is the single
    run's (compare_generations of the same prompt and edits) and none is lost."""
    model, tok = smollm2
    rng = random.Random(0)
    combos = [(i % len(PROMPTS), [rng.choice([e for e in EIGHT if e]) for _ in range(rng.randint(0, 2))])
              for i in range(8)]
    combos = [(p, [x for edits in es for x in edits]) for p, es in combos]
    want = [compare_generations(model, tok, PROMPTS[p], _ivs(es, saes), max_new_tokens=6).steered
            for p, es in combos]
    picks = [rng.randrange(len(combos)) for _ in range(64)]
    lock = threading.Lock()
    got: dict[int, str] = {}

    def one(k: int) -> None:
        p, es = combos[picks[k]]
        body = {**_body(served, p, es), "max_tokens": 6}
        text = _post(served, body)["choices"][0]["text"]
        with lock:
            got[k] = text

    with ThreadPoolExecutor(16) as ex:
        for f in [ex.submit(one, k) for k in range(64)]:
            f.result(timeout=900)
    assert sorted(got) == list(range(64))
    assert all(got[k] == want[picks[k]] for k in range(64))
    assert served.scheduler.max_rows_seen > 1


def test_encode_equals_the_cli_json(served, smollm2, saes) -> None:
    import httpx

    from llamascope_sdk.steering.reading import encode_report, read_features

    model, tok = smollm2
    r = httpx.post(f"{served.url}/v1/encode", json={"sae": "demo", "text": "The city of", "top_k": 3},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
    assert r.status_code == 200, r.text
    want = encode_report(read_features(model, tok, saes[0], "The city of", top_k=3), saes[0])
    got = r.json()
    assert got.pop("sae") == "demo"
    assert got["tokens"] == want["tokens"] and got["l0"] == want["l0"]
    assert [[f for f, _ in row] for row in got["top"][saes[0].name]] == \
           [[f for f, _ in row] for row in want["top"][saes[0].name]]


def test_stop_strings_cut_the_text_streamed_or_not(client, smollm2, saes) -> None:
    """``stop``: the choice ends before the first stop string (not included), finish_reason
    "stop"; the stream's pieces concatenate to the same text; the baseline is cut the same
    way; a bad stop is one 400 naming the field."""
    model, tok = smollm2
    want = compare_generations(model, tok, PROMPT, [], max_new_tokens=16).baseline
    words = want.split()
    stop = " " + words[3]  # a stop string inside the greedy continuation
    cut = want[:want.find(stop)]
    assert 0 < len(cut) < len(want)
    r = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=16, stop=[stop, "zzzq"],
                                  extra_body={"return_baseline": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.steering["baseline"]["text"] == cut and r.steering["baseline"]["finish_reason"] == "stop"
    assert r.usage.completion_tokens < 16
    pieces, reasons = [], []
    for ch in client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=16, stop=stop,
                                        stream=True):
        pieces.append(ch.choices[0].text)
        reasons.append(ch.choices[0].finish_reason)
    assert "".join(pieces) == cut and reasons[-1] == "stop"
    never = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=16, stop="zzzq")
    assert never.choices[0].text == want and never.choices[0].finish_reason == "length"
    import openai

    for bad in (["a", "b", "c", "d", "e"], [""], 5):
        with pytest.raises(openai.BadRequestError, match="stop"):
            client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=4, stop=bad)
