"""Intervention semantics on the tiny Llama: exact deltas, positions under KV cache, subset encode,
feature statistics."""

from __future__ import annotations

import pytest
import torch

from llamascope_sdk import SAE, Ablate, Clamp, FeatureStats, Scale, Steer, attach
from llamascope_sdk.base.errors import SaeNotFoundError
from llamascope_sdk.steering.interventions import stats_for

from .helpers import make_release, tiny_sae

IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10]])


def _flow(model, module, ivs, *, ids=IDS, generate: int = 0, **kw):
    """(clean, edited) outputs of ``module`` per forward: one probe before attach, one after."""
    clean, edited = [], []
    p1 = module.register_forward_hook(lambda m, a, o: clean.append(o.detach().clone()))
    try:
        with attach(model, interventions=ivs, **kw) as h:
            p2 = module.register_forward_hook(lambda m, a, o: edited.append(o.detach().clone()))
            with torch.no_grad():
                if generate:
                    model.generate(ids, max_new_tokens=generate, min_new_tokens=generate,
                                   do_sample=False, pad_token_id=0)
                else:
                    model(input_ids=ids)
            p2.remove()
    finally:
        p1.remove()
    return clean, edited, h


def test_steer_adds_alpha_times_unit_direction_except_at_bos(tiny_llama):
    sae = tiny_sae()
    layer = tiny_llama.model.layers[1]
    (c,), (e,), _ = _flow(tiny_llama, layer, [Steer(sae, [3, 7], [2.0, -1.0])])
    want = 2.0 * sae.W_dec[3] - 1.0 * sae.W_dec[7]
    torch.testing.assert_close(e[0, 1:] - c[0, 1:], want.expand(IDS.shape[1] - 1, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e[0, 0], c[0, 0])
    (c,), (e,), _ = _flow(tiny_llama, layer, [Steer(sae, [3], 2.0)], include_special=True)
    torch.testing.assert_close(e[0, 0] - c[0, 0], 2.0 * sae.W_dec[3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["clamp", "scale", "ablate", "mean"])
def test_feature_edits_keep_the_error_term(tiny_llama, kind):
    sae = tiny_sae(position="M")
    mlp = tiny_llama.model.layers[1].mlp
    idx = [0, 5, 9]
    iv = {"clamp": Clamp(sae, idx, 0.7), "scale": Scale(sae, idx, 3.0),
          "ablate": Ablate(sae, idx), "mean": Ablate(sae, idx, "mean", mean=[0.1, 0.2, 0.3])}[kind]
    (c,), (e,), _ = _flow(tiny_llama, mlp, [iv])
    old = sae.encode(c)[..., idx]
    new = {"clamp": torch.full_like(old, 0.7), "scale": 3 * old, "ablate": torch.zeros_like(old),
           "mean": torch.tensor([0.1, 0.2, 0.3]).expand_as(old)}[kind]
    want = c + (new - old) @ sae.W_dec[idx]
    torch.testing.assert_close(e[:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)
    # Same edit through a splice with the error term: same activation.
    with attach(tiny_llama, [sae], interventions=[iv], splice=True), torch.no_grad():
        out_splice = tiny_llama(input_ids=IDS).logits
    with attach(tiny_llama, interventions=[iv]), torch.no_grad():
        out_delta = tiny_llama(input_ids=IDS).logits
    torch.testing.assert_close(out_splice, out_delta, atol=1e-4, rtol=1e-4)


def test_edits_touch_only_the_chosen_encoder_rows(tiny_llama, monkeypatch):
    sae = tiny_sae()

    def boom(*a, **k):
        raise AssertionError("full encoder used")

    monkeypatch.setattr(sae, "encode", boom)
    monkeypatch.setattr(sae, "pre_acts", boom)
    calls = []
    real = SAE.encode_features
    monkeypatch.setattr(sae, "encode_features", lambda x, i: calls.append(len(i)) or real(sae, x, i))
    _flow(tiny_llama, tiny_llama.model.layers[1], [Clamp(sae, [1, 2], 0.0), Ablate(sae, [4]),
                                                   Steer(sae, [0], 1.0)])
    assert calls == [2, 1]


def test_tc_splice_without_error_replaces_mlp_out(tiny_llama):
    sae = tiny_sae(position="TC", layer=0)
    mlp = tiny_llama.model.layers[0].mlp
    seen = []
    probe = tiny_llama.model.layers[0].post_attention_layernorm.register_forward_pre_hook(
        lambda m, a: seen.append(a[0]))
    try:
        (c,), (e,), h = _flow(tiny_llama, mlp, [], saes=[sae], splice=True, error_term=False)
    finally:
        probe.remove()
    r = seen[0]
    x = r / torch.sqrt(r.pow(2).mean(-1, keepdim=True) + tiny_llama.config.rms_norm_eps)
    torch.testing.assert_close(e[:, 1:], sae(x)[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e[:, 0], c[:, 0])


@pytest.mark.parametrize(("positions", "prompt_on", "gen_on"),
                         [("all", True, True), ("prompt", True, False), ("generated", False, True)])
def test_positions_under_kv_cache(tiny_llama, positions, prompt_on, gen_on):
    sae = tiny_sae()
    clean, edited, h = _flow(tiny_llama, tiny_llama.model.layers[1], [Steer(sae, [2], 5.0, positions)],
                             generate=4, special_ids=[])
    assert [c.shape[1] for c in clean] == [IDS.shape[1], 1, 1, 1]  # the KV cache is in use
    assert h.prompt_len == IDS.shape[1]
    changed = [bool((e - c).abs().amax() > 1e-4) for c, e in zip(clean, edited, strict=True)]
    assert changed == [prompt_on, gen_on, gen_on, gen_on]


def test_slice_and_list_positions(tiny_llama):
    sae = tiny_sae()
    layer = tiny_llama.model.layers[1]
    for positions, want in [(slice(2, 4), [2, 3]), ([1, -1], [1, 6]), (slice(-2, None), [5, 6])]:
        (c,), (e,), _ = _flow(tiny_llama, layer, [Steer(sae, [2], 5.0, positions)])
        got = ((e - c).abs().amax(-1)[0] > 1e-4).nonzero().flatten().tolist()
        assert got == want, positions
    with pytest.raises(ValueError, match="positions"):
        Steer(sae, [2], 1.0, positions="middle")


def test_relative_strength_and_mean_ablation_use_stats(tiny_llama, tmp_path):
    sae = tiny_sae()
    with pytest.raises(SaeNotFoundError, match="feature_stats"):
        stats_for(sae)
    typical = torch.linspace(0.5, 3.0, 256)
    sae.stats = FeatureStats(mean=typical / 10, typical=typical,
                             frequency=torch.full((256,), 0.1), n_tokens=100)
    layer = tiny_llama.model.layers[1]
    (c,), (e,), _ = _flow(tiny_llama, layer, [Steer(sae, [10], 2.0, relative=True)])
    torch.testing.assert_close(e[0, 1:] - c[0, 1:], (2.0 * typical[10] * sae.W_dec[10]).expand(6, -1),
                               atol=1e-5, rtol=1e-5)
    (c,), (e,), _ = _flow(tiny_llama, layer, [Ablate(sae, [10], "mean")])
    old = sae.encode(c)[..., [10]]
    want = c + (typical[10] / 10 - old) * sae.W_dec[10]
    torch.testing.assert_close(e[:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)


def test_stats_file_beside_the_checkpoint(tmp_path):
    folder = make_release(tmp_path / "L1R", d_model=64, d_sae=256)
    sae = SAE.from_pretrained(folder)
    stats = FeatureStats(mean=torch.rand(256), typical=torch.rand(256) + 1, frequency=torch.rand(256),
                         n_tokens=1234)
    assert stats.save(folder).name == "feature_stats.safetensors"
    fresh = SAE.from_pretrained(folder)
    got = fresh.stats
    assert got.n_tokens == 1234
    torch.testing.assert_close(got.typical, stats.typical)
    with pytest.raises(ValueError, match=r"shape \[3\], expected \[256\]"):
        sae.stats = FeatureStats(torch.zeros(3), torch.zeros(3), torch.zeros(3), 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        sae.stats = FeatureStats(torch.full((256,), float("nan")), torch.zeros(256),
                                 torch.zeros(256), 1)
