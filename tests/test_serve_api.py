"""`llamascope serve` for evaluation harnesses: log-probabilities, echo, token prompts, several
prompts and samples per request, stream options, steering presets, the tokenizer endpoints, and
fields it cannot honour refused by name.

Every log-probability is checked against a direct forward of the same model with the same edits
(fp32, 1e-5 per token); the request bodies are the ones lm-eval 0.4.13's ``local-completions``
sends (``models/openai_completions.py``: loglikelihood ``{"prompt": [[ids], ...], "max_tokens": 1,
"logprobs": 1, "echo": true, "temperature": 0, "seed": 1234}``; generate_until ``{"prompt":
[[ids]], "max_tokens", "temperature", "stop", "seed"}``), read the way its parser reads them.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from llamascope_sdk import SAE, Steer, attach
from llamascope_sdk.loading import demo
from tests.serve_helpers import KEY, MODEL_ID, running_server, scheduler_paused, wait_for

pytestmark = pytest.mark.smollm
AUTH = {"Authorization": f"Bearer {KEY}"}
TOL = 1e-4  # float32 on CPU: batched (padded) forwards round differently from one plain one
STEER = [{"sae": "demo", "feature": 4154, "value": 80.0, "positions": "all"}]


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory):
    model, tok = smollm2
    with running_server(model, tok, tmp_path_factory.mktemp("api") / "L5R", max_batch=8,
                        presets={"sea": STEER}) as s:
        yield s


@pytest.fixture(scope="module")
def steer():
    return [Steer(SAE.from_pretrained(demo.DEMO_SAE_DIR), [4154], 80.0)]


def _post(served, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{served.url}{path}", json=body, headers=AUTH, timeout=300)


def _ok(served, body: dict, path: str = "/v1/completions") -> dict:
    r = _post(served, body, path)
    assert r.status_code == 200, r.text
    return r.json()


def _direct(model, ids: list[int], ivs=()) -> list[float | None]:
    """log p(ids[t] | ids[:t]) from one plain forward under attach (None for the first)."""
    with attach(model, interventions=list(ivs), capture=False), torch.no_grad():
        lp_TV = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [None] + [lp_TV[t - 1, ids[t]].item() for t in range(1, len(ids))]


def _loglikelihood(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """What lm-eval's local-completions makes of a choice: the continuation's summed
    log-probability (positions ctxlen..-1: the last is the one generated token) and whether
    each continuation token was the most likely one."""
    lp = choice["logprobs"]
    toks, tops = lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]
    return sum(toks), all(t == max(top.values()) for t, top in zip(toks, tops, strict=True))


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _same_choices(a: list[dict], b: list[dict]) -> None:
    """The same choices, log-probabilities within TOL: the generated token's come from the
    batch's last-position logits, whose matrix product may round by the row's place in the
    batch (a last-digit difference on some CPUs)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        lx, ly = x.pop("logprobs"), y.pop("logprobs")
        assert x == y
        assert lx["tokens"] == ly["tokens"] and lx["text_offset"] == ly["text_offset"]
        assert lx["token_logprobs"][1:] == pytest.approx(ly["token_logprobs"][1:], abs=TOL, rel=0)
        for tx, ty in zip(lx["top_logprobs"][1:], ly["top_logprobs"][1:], strict=True):
            assert list(tx) == list(ty) and list(tx.values()) == pytest.approx(
                list(ty.values()), abs=TOL, rel=0)
        x["logprobs"], y["logprobs"] = lx, ly


def test_lm_eval_loglikelihood_requests_equal_direct_forwards(served, smollm2, steer) -> None:
    """lm-eval's loglikelihood body, two (context, continuation) pairs per request, unsteered
    and steered (preset model and steering field) admitted together in one batch."""
    model, tok = smollm2
    pairs = [("Question: What colour is the sky?\nAnswer:", " blue"),
             ("The capital of France is", " the city of Paris")]
    seqs = [_ids(tok, c) + _ids(tok, x) for c, x in pairs]
    ctxlens = [len(_ids(tok, c)) for c, _ in pairs]
    base = {"model": MODEL_ID, "prompt": seqs, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    bodies = [base, {**base, "model": f"{MODEL_ID}:sea"}, {**base, "steering": STEER}]
    _ok(served, bodies[1])  # loads the SAE first, so that the three wait in the queue together
    with ThreadPoolExecutor(3) as ex, scheduler_paused(served.scheduler):
        futs = [ex.submit(_ok, served, b) for b in bodies]
        wait_for(lambda: served.scheduler.load["waiting"] == 3)
    plain, preset, field = (f.result(timeout=600) for f in futs)
    _same_choices(preset["choices"], field["choices"])
    for out, ivs in ((plain, []), (preset, steer)):
        assert [c["index"] for c in out["choices"]] == [0, 1]
        for choice, ids, ctxlen in zip(out["choices"], seqs, ctxlens, strict=True):
            lp = choice["logprobs"]
            want = _direct(model, ids, ivs)
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want[1:], abs=TOL, rel=0)
            assert len(lp["tokens"]) == len(ids) + 1  # the prompt, then the generated token
            got, greedy = _loglikelihood(choice, ctxlen)
            assert got == pytest.approx(sum(want[ctxlen:]), abs=len(ids) * TOL)
            with attach(model, interventions=list(ivs), capture=False), torch.no_grad():
                best = model(torch.tensor([ids])).logits[0, ctxlen - 1:-1].argmax(-1).tolist()
            assert greedy == (best == ids[ctxlen:])
    assert plain["usage"]["prompt_tokens"] == sum(map(len, seqs))
    moved = abs(_loglikelihood(preset["choices"][0], ctxlens[0])[0]
                - _loglikelihood(plain["choices"][0], ctxlens[0])[0])
    assert moved > 0.1  # the steer changes the scores


def test_lm_eval_generate_until_request_and_token_prompts(served, smollm2) -> None:
    """generate_until's body (prompt [[ids]], stop list, seed) gives the text a string prompt
    without BOS gives; a list of strings and id lists gives one choice per prompt, in order,
    each equal to its own request."""
    _, tok = smollm2
    ids = _ids(tok, "The capital of France is")
    body = {"prompt": [ids], "model": MODEL_ID, "max_tokens": 8, "temperature": 0,
            "stop": ["\n", "."], "seed": 1234}
    one = _ok(served, body)["choices"]
    assert len(one) == 1 and one[0]["index"] == 0
    prompts: list = ["Once upon a time", ids, "The sea is"]
    many = _ok(served, {"prompt": prompts, "max_tokens": 5})["choices"]
    alone = [_ok(served, {"prompt": p, "max_tokens": 5})["choices"][0]["text"] for p in prompts]
    assert [c["text"] for c in many] == alone
    assert [c["index"] for c in many] == [0, 1, 2]
    assert alone[1] == one[0]["text"][:len(alone[1])] or one[0]["finish_reason"] == "stop"


def test_echo_max_tokens_zero_and_text_offsets(served, smollm2) -> None:
    model, tok = smollm2
    text = "Dear friend, the sea is calm"
    out = _ok(served, {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 3})
    (choice,) = out["choices"]
    assert choice["text"] == text and out["usage"]["completion_tokens"] == 0
    from llamascope_sdk.loading.models import tokenize

    ids = tokenize(tok, text)[0].tolist()  # BOS first, as the server tokenises a text prompt
    lp = choice["logprobs"]
    assert lp["token_logprobs"][1:] == pytest.approx(_direct(model, ids)[1:], abs=TOL, rel=0)
    assert lp["tokens"] == [tok.decode([i]) for i in ids]
    for t, off in zip(lp["tokens"][1:], lp["text_offset"][1:], strict=True):
        assert choice["text"][off:off + len(t)] == t
    assert all(len(top) == 3 for top in lp["top_logprobs"][1:])
    r = _post(served, {"prompt": text, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_generated_token_logprobs_with_the_openai_client(served, smollm2, steer) -> None:
    from openai import OpenAI

    model, tok = smollm2
    client = OpenAI(base_url=f"{served.url}/v1", api_key=KEY, timeout=300, max_retries=0)
    r = client.completions.create(model=f"{MODEL_ID}:sea", prompt="The sea is", max_tokens=5,
                                  logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    from llamascope_sdk.loading.models import tokenize

    ids = tokenize(tok, "The sea is")[0].tolist()
    full = list(ids)
    with attach(model, interventions=steer, capture=False), torch.no_grad():
        for _ in range(5):  # greedy, one full forward per token (the steer is at every position)
            full.append(int(model(torch.tensor([full])).logits[0, -1].argmax()))
    assert lp.tokens == [tok.decode([i]) for i in full]
    assert lp.token_logprobs[1:] == pytest.approx(_direct(model, full, steer)[1:], abs=TOL, rel=0)
    for t, x, top in zip(lp.tokens[len(ids):], lp.token_logprobs[len(ids):],
                         lp.top_logprobs[len(ids):], strict=True):
        assert list(top)[0] == t and top[t] == x  # greedy: the token is the most likely one
    chat = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(c.top_logprobs[0].logprob == c.logprob and len(c.top_logprobs) == 2
               for c in content)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                     add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    gen = tok(chat.choices[0].message.content, add_special_tokens=False)["input_ids"]
    want = _direct(model, list(prompt) + gen)[len(prompt):]
    assert [c.logprob for c in content] == pytest.approx(want, abs=TOL, rel=0)


def test_n_samples_are_seeded_per_choice(served) -> None:
    body = {"prompt": ["Once upon a time", "The sea is"], "max_tokens": 6, "temperature": 1.0,
            "n": 3, "seed": 7}
    out = _ok(served, body)["choices"]
    assert [c["index"] for c in out] == list(range(6))
    assert _ok(served, body)["choices"] == out  # seeded: the same again
    # choice i is prompt i // n, seed + i % n
    single = _ok(served, {**body, "prompt": "The sea is", "n": 1, "seed": 9})["choices"][0]
    assert single["text"] == out[5]["text"]
    assert len({c["text"] for c in out[:3]}) > 1  # sampled, not copies
    r = _post(served, {**body, "n": 5})  # 10 rows, the batch holds 8
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def _events(served, body: dict, path: str = "/v1/completions") -> list[dict]:
    with httpx.stream("POST", f"{served.url}{path}", json=body, headers=AUTH, timeout=300) as r:
        assert r.status_code == 200
        lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_streams_usage_baseline_and_logprobs(served) -> None:
    body = {"prompt": "The sea is", "max_tokens": 8, "steering": STEER, "return_baseline": True,
            "logprobs": 1}
    whole = _ok(served, body)
    ev = _events(served, {**body, "stream": True, "stream_options": {"include_usage": True}})
    text = "".join(c["text"] for e in ev for c in e["choices"])
    base = "".join(e["steering"]["baseline"]["text"] for e in ev if "baseline" in e.get("steering", {}))
    assert text == whole["choices"][0]["text"] and base == whole["steering"]["baseline"]["text"]
    assert text != base
    assert ev[0]["steering"]["applied"] == whole["steering"]["applied"]
    assert ev[-1]["choices"] == [] and ev[-1]["usage"] == whole["usage"]
    assert all(e["usage"] is None for e in ev[:-1])
    toks = [t for e in ev for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert toks == whole["choices"][0]["logprobs"]["tokens"]
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2,
            "temperature": 1.0, "seed": 3}
    whole = _ok(served, chat, "/v1/chat/completions")
    ev = _events(served, {**chat, "stream": True}, "/v1/chat/completions")
    for i in range(2):
        got = "".join(c["delta"].get("content", "") for e in ev for c in e["choices"]
                      if c["index"] == i)
        assert got == whole["choices"][i]["message"]["content"]


@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/v1/completions", {"top_k": 5}, "top_k"),
    ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"logit_bias": {"42": 3}}, "logit_bias"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"n": 2, "return_baseline": True}, "return_baseline"),
    ("/v1/completions", {"prompt": ["a", 5]}, "prompt"),
    ("/v1/completions", {"model": "other"}, "model"),
    ("/v1/completions", {"model": f"{MODEL_ID}:sea", "steering": STEER}, "steering"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools"),
])
def test_fields_it_cannot_honour_are_refused_by_name(served, path, extra, param) -> None:
    body = ({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else
            {"prompt": "Hi"})
    r = _post(served, {**body, "max_tokens": 2, **extra}, path)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["param"] == param and "\n" not in err["message"]


def test_neutral_values_and_inert_fields_are_accepted(served) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0,
            "logit_bias": {}, "best_of": 1, "user": "me", "suffix": None, "echo": False}
    assert _post(served, body).status_code == 200


def test_tokenizer_endpoints_as_lm_eval_probes_them(served, smollm2) -> None:
    _, tok = smollm2
    info = httpx.get(f"{served.url}/tokenizer_info", headers=AUTH, timeout=30).json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    r = _ok(served, {"prompt": "test sea", "add_special_tokens": False}, "/tokenize")
    assert r["tokens"] == _ids(tok, "test sea") and r["count"] == len(r["tokens"])
    assert _ok(served, {"tokens": r["tokens"]}, "/detokenize")["prompt"] == "test sea"
    assert _post(served, {"tokens": [10**9]}, "/detokenize").status_code == 400
    models = httpx.get(f"{served.url}/v1/models", headers=AUTH, timeout=30).json()
    assert [m["id"] for m in models["data"]] == [MODEL_ID, f"{MODEL_ID}:sea"]
