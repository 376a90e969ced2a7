"""Steering and reading on the real SmolLM2-135M: generate with the KV cache, read_features,
compare_generations, feature_stats and relative strengths."""

from __future__ import annotations

import json

import pytest
import torch

from llamascope_sdk import (
    FeatureStats,
    Steer,
    attach,
    compare_generations,
    measure_feature_stats,
    read_features,
)
from llamascope_sdk.loading.models import special_ids, tokenize

from .test_hooks import synthetic_sae

pytestmark = pytest.mark.smollm

PROMPT = "Here is a short story about a dog:"
TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "Paris is the capital of France, and Berlin is the capital of Germany."]
LAYER, NEW = 10, 10


@pytest.fixture(scope="module")
def setup(smollm2):
    model, tok = smollm2
    ids = tokenize(tok, TEXTS[0])
    sae = synthetic_sae(model, ids, LAYER, "R", seed=5, tied=True)
    with torch.no_grad():
        resid = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1]
    return model, tok, sae, float(resid[0, 1:].norm(dim=-1).mean())


def test_steering_changes_greedy_text_and_zero_reproduces_it(setup):
    model, tok, sae, norm = setup
    zero = compare_generations(model, tok, PROMPT, [Steer(sae, [7], 0.0)], max_new_tokens=NEW)
    assert zero.steered_ids == zero.baseline_ids and zero.steered == zero.baseline
    strong = compare_generations(model, tok, PROMPT, [Steer(sae, [7], 2.0 * norm)], max_new_tokens=NEW)
    assert strong.baseline_ids == zero.baseline_ids
    assert strong.steered_ids != strong.baseline_ids
    d = json.loads(json.dumps(strong.to_dict()))
    assert d["prompt"] == PROMPT and d["steered"] == strong.steered


def _read_generation(model, tok, sae, ivs):
    ids = tokenize(tok, PROMPT)
    with attach(model, interventions=ivs, special_ids=special_ids(tok)), \
            attach(model, [sae], special_ids=special_ids(tok), capture=("features",)) as read, \
            torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist(), read.features[sae.name][0], read.prompt_len


def test_steered_feature_rises_on_generated_tokens_only(setup):
    model, tok, sae, norm = setup
    feat = 7
    base_ids, base_f, plen = _read_generation(model, tok, sae, [])
    ids, f, plen2 = _read_generation(model, tok, sae, [Steer(sae, [feat], norm, positions="generated")])
    assert plen == plen2 == len(tokenize(tok, PROMPT)[0])
    assert f.shape[0] == plen + NEW - 1  # the last new token is never fed back
    # "generated" starts at the first new token's position: the first new token, predicted from
    # the last prompt position, is unchanged, and the prompt positions read the same.
    assert ids[0] == base_ids[0]
    torch.testing.assert_close(f[:plen], base_f[:plen])
    assert f[plen:, feat].mean() > base_f[plen:, feat].mean() + 0.5 * norm


def test_read_features_tokens_top_and_specials(setup):
    model, tok, sae, _ = setup
    r = read_features(model, tok, {"res": sae}, TEXTS[1], top_k=3)
    assert r.token_ids[0] == tok.bos_token_id and r.tokens[0] == "<|im_start|>"
    assert len(r.tokens) == len(r.token_ids) == r.acts["res"].shape[0] == len(r.top["res"])
    assert r.top["res"][0] == [] and not r.acts["res"][0].any()  # BOS excluded
    row = r.top["res"][1]
    assert len(row) == 3 and row[0][1] >= row[1][1] >= row[2][1] > 0
    assert row[0][1] == pytest.approx(float(r.acts["res"][1].max()))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["l0"]["res"][0] == 0 and d["l0"]["res"][1] > 3
    with_bos = read_features(model, tok, sae, TEXTS[1], include_special=True)
    assert with_bos.acts[sae.name][0].any()
    from_ids = read_features(model, tok, {"res": sae}, r.token_ids, top_k=3)
    assert from_ids.token_ids == r.token_ids and from_ids.top == r.top


def test_feature_stats_and_relative_strength(setup, tmp_path):
    model, tok, sae, norm = setup
    stats = measure_feature_stats(model, tok, sae, TEXTS, save_to=tmp_path)
    n_real = sum(len(tokenize(tok, t)[0]) - 1 for t in TEXTS)
    assert stats.n_tokens == n_real
    loaded = FeatureStats.load(tmp_path / "feature_stats.safetensors")
    torch.testing.assert_close(loaded.typical, stats.typical)
    fired = stats.frequency > 0
    # typical = mean of the non-zero activations, so mean = typical * frequency.
    torch.testing.assert_close(stats.mean, stats.typical * stats.frequency, atol=1e-5, rtol=1e-4)
    feat = int(torch.nonzero(fired)[0])
    ids = tokenize(tok, TEXTS[0])
    layer = model.model.layers[LAYER]
    got = []
    clean_probe = layer.register_forward_hook(lambda m, a, o: got.append(o.detach().clone()))
    try:
        with attach(model, interventions=[Steer(sae, [feat], 3.0, relative=True)]), torch.no_grad():
            edited_probe = layer.register_forward_hook(lambda m, a, o: got.append(o.detach().clone()))
            model(input_ids=ids)
            edited_probe.remove()
    finally:
        clean_probe.remove()
    want = 3.0 * stats.typical[feat] * sae.W_dec[feat]
    torch.testing.assert_close(got[1][0, 1:] - got[0][0, 1:], want.expand(ids.shape[1] - 1, -1),
                               atol=1e-4, rtol=1e-4)
    res = compare_generations(model, tok, PROMPT, [Steer(sae, [feat], 0.0, relative=True)],
                              max_new_tokens=4)
    assert res.steered_ids == res.baseline_ids
