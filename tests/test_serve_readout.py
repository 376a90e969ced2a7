"""`llamascope serve` with readouts and conditional edits, against the real server on 127.0.0.1
and SmolLM2-135M in fp32: a readout equals `llamascope encode` on the same text (and the
library's read_features on the generated tokens), streamed or not, with percentiles read off a
feature store; 8 concurrent mixed requests with conditional edits give the tokens of a
reference loop written here (whole sequence recomputed at every step, plain PyTorch hooks,
the condition checked position by position)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from llamascope_sdk import SAE
from llamascope_sdk.loading import demo
from llamascope_sdk.steering.reading import read_features
from llamascope_sdk.store.percentile import percentiles
from tests.serve_helpers import KEY, running_server, scheduler_paused, wait_for

pytestmark = pytest.mark.smollm

PROMPT = "The old castle stood on the hill, and the king said"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def store_dir(smollm2, tmp_path_factory) -> Path:
    """A small feature store of the demo SAE, mined here on the shipped corpus excerpt."""
    from llamascope_sdk.mining.mine import mine
    from llamascope_sdk.store.feature_store import FeatureStore

    model, tok = smollm2
    sae = SAE.from_pretrained(demo.DEMO_SAE_DIR)
    text = (Path(__file__).parent / "data" / "corpus" / "tinyshakespeare.txt").read_text()
    docs = [text[i:i + 2000] for i in range(0, 8000, 2000)]
    res = mine(model, tok, sae, docs, tokens=1024, context=128, batch_size=4, top_n=4,
               n_samples=4, n_nonactivating=4, nonactivating_pool=8, progress=False)[sae.name]
    out = tmp_path_factory.mktemp("store") / "demo_store"
    FeatureStore.from_result(res, tok, sae_spec="demo").save(out)
    return out


@pytest.fixture(scope="module")
def served(smollm2, store_dir, tmp_path_factory):
    model, tok = smollm2
    with running_server(model, tok, tmp_path_factory.mktemp("serve") / "L5R",
                        stores=(str(store_dir),)) as s:
        yield s


@pytest.fixture(scope="module")
def saes(served):
    return SAE.from_pretrained(demo.DEMO_SAE_DIR), SAE.from_pretrained(served.layer5)


def _post(served, body: dict, path: str = "/v1/completions") -> dict:
    r = httpx.post(f"{served.url}{path}", json=body, headers=HEADERS, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def _encode_cli_json(prompt: str, top_k: int) -> dict:
    from typer.testing import CliRunner

    from llamascope_sdk.cli.app import app

    res = CliRunner().invoke(app, ["encode", "--sae", "demo", "--prompt", prompt, "--top-k",
                                   str(top_k), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_top_k_readout_equals_llamascope_encode(served, smollm2, saes) -> None:
    model, tok = smollm2
    out = _post(served, {"prompt": PROMPT, "max_tokens": 6, "readout": {"sae": "demo", "top_k": 5}})
    readout = out["choices"][0]["readout"]
    assert len(readout) == 1 and readout[0]["sae"] == "demo" and readout[0]["top_k"] == 5
    rows = readout[0]["tokens"]
    cli = _encode_cli_json(PROMPT, 5)
    n_prompt = len(cli["token_ids"])
    gen = out["usage"]["completion_tokens"]
    assert [r["position"] for r in rows] == list(range(n_prompt + gen))
    assert [r["token_id"] for r in rows[:n_prompt]] == cli["token_ids"]
    for r, want in zip(rows[:n_prompt], cli["top"][demo.DEMO_SAE_NAME], strict=True):
        got = [(f, v) for f, v in zip(r["features"], r["values"], strict=True) if v > 0]
        assert [f for f, _ in got] == [f for f, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-4)
    # the generated tokens: the library's reading of prompt + reply, as ids
    ids = [r["token_id"] for r in rows]
    reading = read_features(model, tok, saes[0], ids, top_k=5)
    for r, want in zip(rows[n_prompt:], reading.top[saes[0].name][n_prompt:], strict=True):
        got = [(f, v) for f, v in zip(r["features"], r["values"], strict=True) if v > 0]
        assert [f for f, _ in got] == [f for f, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-4)
    assert tok.decode(ids[n_prompt:], skip_special_tokens=True) == out["choices"][0]["text"]


def test_named_readout_streamed_equals_not_streamed_and_has_percentiles(served, smollm2, saes,
                                                                        store_dir) -> None:
    from llamascope_sdk.store.feature_store import FeatureStore

    model, tok = smollm2
    feats = [4154, 1297, 1062, 7, 100, 2000, 3000, 4000]
    body = {"prompt": PROMPT, "max_tokens": 5, "readout": {"sae": "demo", "features": feats},
            "steering": [{"sae": "demo", "feature": 4154, "value": 40.0}]}
    whole = _post(served, body)["choices"][0]["readout"][0]
    streamed: list[dict] = []
    with httpx.stream("POST", f"{served.url}/v1/completions", json={**body, "stream": True},
                      headers=HEADERS, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for ro in json.loads(line[6:])["choices"][0].get("readout", []):
                    streamed += ro["tokens"]
    assert streamed == whole["tokens"] and whole["features"] == feats
    # values: the steered run's activations, read before the edit at the SAE's own site:
    # equal to reading the same ids unsteered there (the edit is at the read site)
    ids = [t["token_id"] for t in whole["tokens"]]
    acts = read_features(model, tok, saes[0], ids, top_k=0).acts[saes[0].name][:, feats]
    got = torch.tensor([t["values"] for t in whole["tokens"]])
    assert torch.allclose(got, acts.float(), atol=1e-4)
    store = FeatureStore.load(store_dir)
    want = percentiles(store.hist, torch.tensor(store.meta["histogram_edges"]),
                       torch.tensor(feats), got)
    pct = torch.tensor([[float("nan") if p is None else p for p in t["percentiles"]]
                        for t in whole["tokens"]])
    assert torch.allclose(pct, want, atol=1e-3, equal_nan=True)
    assert bool(((pct >= 0) & (pct <= 100) | pct.isnan()).all()) and bool((pct > 0).any())


# --------------------------------------------------------------------------- conditions
def _reference(model, ids: list[int], n_new: int, edits: list[dict], special: set[int]) -> list[int]:
    """Greedy continuation; each edit adds ``vector`` at the output of decoder layer
    ``layer`` where ``cond(x_TD)[t]`` holds for the output of layer ``cond_layer`` (read before any
    edit of that layer), never at special tokens, latched if asked. No KV cache."""
    seq = list(ids)
    reads: dict[int, torch.Tensor] = {}
    for _ in range(n_new):
        reads.clear()

        def hook(layer):
            def fn(_m, _a, out):
                h = out[0] if isinstance(out, tuple) else out
                reads[layer] = h[0].detach().clone()
                mine = [e for e in edits if e["layer"] == layer]
                if not mine:
                    return None
                h = h.clone()
                for e in mine:
                    fires_T = e["cond"](reads[e["cond_layer"]]).tolist()  # one reading per position
                    on = False
                    for t in range(h.shape[1]):
                        fires = fires_T[t] and seq[t] not in special
                        on = (on or fires) if e["latch"] else fires
                        if on and seq[t] not in special:
                            h[0, t] += e["vector"]
                return (h, *out[1:]) if isinstance(out, tuple) else h
            return fn

        layers = sorted({e["layer"] for e in edits} | {e["cond_layer"] for e in edits})
        handles = [model.model.layers[i].register_forward_hook(hook(i)) for i in layers]
        try:
            with torch.no_grad():
                logits = model(torch.tensor([seq]), use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


def _between(v: torch.Tensor) -> float:
    """A threshold halfway between two neighbouring values around the median (no reading sits
    on it, where float rounding would decide)."""
    s = v.flatten().sort().values
    i = max(1, s.numel() // 2)
    return float(s[i - 1] + s[i]) / 2 if s.numel() > 1 else float(s[0]) / 2


PROMPTS = ["The old castle stood on the hill, and the king said",
           "My favourite city is", "Once upon a time there was a", "The recipe calls for"]


def test_eight_concurrent_conditional_requests_equal_the_reference_loop(served, smollm2,
                                                                         saes) -> None:
    model, tok = smollm2
    demo_sae, l5 = saes
    special = set(tok.all_special_ids)
    ids = [[int(i) for i in tok(p, add_special_tokens=False)["input_ids"]] for p in PROMPTS]
    ids = [[tok.bos_token_id, *i] if tok.bos_token_id is not None else i for i in ids]
    direction = torch.randn(576, generator=torch.Generator().manual_seed(3))
    unit = direction / direction.norm()
    # thresholds: the median reading on the first prompt unsteered, so conditions fire often
    with torch.no_grad():
        hs = model(torch.tensor([ids[0]]), output_hidden_states=True).hidden_states
    f_TF = l5.encode(hs[6][0])[1:]  # without BOS
    fired = (f_TF > 0).sum(0)
    f5 = int(torch.where(fired < f_TF.shape[0], fired, 0).argmax())  # fires often, not always
    t5 = _between(f_TF[:, f5][f_TF[:, f5] > 0])
    t_dir = _between(hs[11][0] @ unit)
    v4154 = 40.0 * demo_sae.W_dec[4154]
    kinds = [
        ({"when": {"sae": served.layer5, "feature": f5, "above": t5}},
         lambda x_TD: l5.encode(x_TD)[:, f5] > t5, 5, False),
        ({"when": {"sae": served.layer5, "feature": f5, "above": t5, "latch": True}},
         lambda x_TD: l5.encode(x_TD)[:, f5] > t5, 5, True),
        ({"when": {"direction": direction.tolist(), "hook_point": "blocks.10.hook_resid_post",
                   "above": t_dir}},
         lambda x_TD: x_TD @ unit > t_dir, 10, False),
        (None, None, None, None),
    ]
    bodies, refs = [], []
    for i in range(8):
        when, cond, layer, latch = kinds[i % 4]
        p = ids[i % len(ids)]
        body = {"prompt": p, "max_tokens": 6, "readout": {"sae": "demo", "top_k": 1}}
        if when is not None:
            body["steering"] = [{"sae": "demo", "feature": 4154, "value": 40.0, **when}]
            refs.append(_reference(model, p, 6, [{"layer": 15, "cond_layer": layer,
                                                  "cond": cond, "latch": latch,
                                                  "vector": v4154}], special))
        else:
            refs.append(_reference(model, p, 6, [], special))
        bodies.append(body)
    with ThreadPoolExecutor(8) as ex, scheduler_paused(served.scheduler):
        futs = [ex.submit(_post, served, b) for b in bodies]
        wait_for(lambda: served.scheduler.load["waiting"] == 8)  # admitted together
    outs = [f.result(timeout=600) for f in futs]
    got = [[t["token_id"] for t in o["choices"][0]["readout"][0]["tokens"]] for o in outs]
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    for g, want, b in zip(got, refs, bodies, strict=True):
        end = next((i + 1 for i, t in enumerate(want) if t in stops), len(want))
        assert g[len(b["prompt"]):] == want[:end]  # the server stops after EOS
    assert served.scheduler.max_rows_seen >= 8
    # the conditions mattered: a conditional row differs from the always-on edit
    always = _reference(model, ids[0], 6, [{"layer": 15, "cond_layer": 15, "latch": False,
                                            "cond": lambda x_TD: torch.ones(len(x_TD), dtype=torch.bool),
                                            "vector": v4154}], special)
    plain = _reference(model, ids[0], 6, [], special)
    assert refs[0] not in (always, plain) or refs[2] not in (always, plain)
    assert "when feature" in outs[0]["steering"]["applied"][0]


@pytest.mark.parametrize(("extra", "param"), [
    ({"readout": {"sae": "demo", "features": [4608]}}, "readout.features"),
    ({"readout": {"sae": "demo", "top_k": 1000}}, "readout.top_k"),
    ({"readout": [{"sae": "demo"}]}, "readout[0]"),
    ({"steering": [{"sae": "demo", "feature": 1, "value": 1.0,
                    "when": {"sae": "demo", "feature": 4608, "above": 1}}]},
     "steering[0].when.feature"),
    ({"steering": [{"sae": "demo", "feature": 1, "value": 1.0,
                    "when": {"direction": [1.0] * 576, "hook_point": "blocks.20.hook_resid_post",
                             "above": 1}}]}, "steering[0].when"),
    ({"steering": [{"sae": "demo", "feature": 1, "value": 1.0,
                    "when": {"direction": [1.0] * 3, "hook_point": "blocks.2.hook_resid_post",
                             "above": 1}}]}, "steering[0].when.direction"),
    ({"steering": [{"sae": "demo", "feature": 1, "value": 1.0, "when": {"above": "x"}}]},
     "steering[0].when.above"),
])
def test_bad_readouts_and_conditions_are_400s_naming_the_field(served, extra, param) -> None:
    r = httpx.post(f"{served.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **extra},
                   headers=HEADERS, timeout=600)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "\n" not in err["message"]
