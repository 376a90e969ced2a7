"""LLM-free descriptions: TokenChange batched over features equals steering one feature at a
time with attach + Steer; VocabProj is the store's logit lens; transcoders work the same."""

from __future__ import annotations

import json

import pytest
import torch

from llamascope_sdk import FeatureStats, Steer, attach
from llamascope_sdk.explain.llm_free import PROMPTS, describe_outputs, token_change
from llamascope_sdk.loading.models import tokenize
from llamascope_sdk.mining.mine import mine
from llamascope_sdk.store import view
from llamascope_sdk.store.feature_store import FeatureStore

from .conftest import CharTokenizer
from .test_hooks import synthetic_sae
from .test_mining import DOCS


def _sae(model, position):
    ids = torch.randint(3, 99, (2, 24))
    ids[:, 0] = 1
    sae = synthetic_sae(model, ids, 1, position, d_sae=96, l0=8)
    sae.stats = FeatureStats(mean=torch.full((96,), 0.1), typical=torch.linspace(0.5, 2.0, 96),
                             frequency=torch.full((96,), 0.1), n_tokens=100)
    sae.stats.typical[5] = 0.0  # never fired: no TokenChange
    return sae


FEW = PROMPTS[:3]


def one_at_a_time(model, tok, sae, f, strength=4.0):
    """The existing steering, feature by feature: the mean change of next-token probabilities."""
    total = None
    for text in FEW:
        ids = tokenize(tok, text)
        with torch.no_grad():
            p0 = model(ids).logits[0, -1].softmax(-1)
            with attach(model, interventions=[Steer(sae, [f], strength, relative=True)],
                        capture=False):
                p1 = model(ids).logits[0, -1].softmax(-1)
        total = (p1 - p0) if total is None else total + (p1 - p0)
    return total / len(FEW)


@pytest.mark.parametrize("position", ["R", "TC"])
def test_token_change_batched_equals_steering_one_at_a_time(tiny_llama, position):
    tok = CharTokenizer()
    sae = _sae(tiny_llama, position)
    feats = [0, 5, 30, 95]
    got = token_change(tiny_llama, tok, sae, feats, k=6, chunk=2, prompts=FEW)  # 2 chunks
    assert sorted(got) == [0, 30, 95]  # 5 never fired
    for f in (0, 30, 95):
        want = one_at_a_time(tiny_llama, tok, sae, f)
        v, idx = want.topk(6)
        assert [t for t, _ in got[f]] == idx.tolist()
        assert [d for _, d in got[f]] == pytest.approx(v.tolist(), abs=1e-6)


def test_describe_outputs_writes_vocab_proj_and_token_change(tiny_llama, tmp_path):
    tok = CharTokenizer()
    ids = torch.randint(3, 99, (2, 24))
    ids[:, 0] = 1
    sae = synthetic_sae(tiny_llama, ids, 1, "TC", d_sae=96, l0=8)
    res = mine(tiny_llama, tok, sae, DOCS, tokens=300, context=40, batch_size=4, top_n=4,
               n_samples=4, window_before=3, window_after=2, progress=False)[sae.name]
    store = FeatureStore.from_result(res, tok, model=tiny_llama)
    store.save(tmp_path / "store")
    store = FeatureStore.load(tmp_path / "store")
    fired = [int(i) for i in (store.stats.frequency > 0).nonzero().squeeze(1)[:3]]
    folder = describe_outputs(store, fired, model=tiny_llama, tokenizer=tok, sae=sae, k=4)
    assert folder == tmp_path / "store" / "explanations" / "llm-free"
    rec = json.loads((folder / "features" / f"{fired[0]}.json").read_text())
    lens = view.logit_lens(store, fired[0])
    assert rec["vocab_proj"]["promoted"] == [t for t, _ in lens["promoted"]]
    want = token_change(tiny_llama, tok, sae, [fired[0]], k=4)[fired[0]]
    assert [t for t, _ in rec["token_change"]["tokens"]] == [tok.decode([t]) for t, _ in want]
