"""The demo transcoder set (issue 25 item 6): names, shapes, the replacement-model quality
measure against an independent computation, and the cached feature stores."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llamascope_sdk.base.errors import IncompatibleModelError
from llamascope_sdk.loading.demo import DEMO_TC_DIR, demo_tc_layer, demo_tc_name
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.trace.demo import demo_transcoders, is_demo_transcoders
from llamascope_sdk.trace.quality import replacement_quality
from tests.helpers import tiny_sae


def _swapped_mlp_logits(model, tcs: dict[int, SAE], ids: torch.Tensor, keep: torch.Tensor):
    """Reference: each MLP module's forward swapped for x -> tc(x / rms(x)) (no hooks), true MLP
    output kept where ``keep`` is False."""
    layers = model.model.layers
    saved = {L: layers[L].mlp.forward for L in tcs}
    try:
        for L, tc in tcs.items():
            norm = layers[L].post_attention_layernorm
            mlp = layers[L].mlp

            def fwd(h, tc=tc, norm=norm, orig=saved[L]):
                y = orig(h)
                r = h / norm.weight  # the MLP input is gain * r / rms(r): undo the gain
                x = r.float() * torch.rsqrt(r.float().pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
                return torch.where(keep[..., None], tc(x).to(y.dtype), y)

            mlp.forward = fwd
        with torch.no_grad():
            return model(input_ids=ids).logits.float()
    finally:
        for L, f in saved.items():
            layers[L].mlp.forward = f


def test_replacement_quality_matches_swapped_mlps(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(3, 99, (2, 12))
    ids[:, 0] = 1  # BOS: left clean
    tcs = {L: tiny_sae(layer=L, position="TC", seed=L, d_sae=128, threshold=0.02) for L in range(3)}
    q = replacement_quality(tiny_llama, list(tcs.values()), ids, {0, 1, 2})
    keep = ids != 1
    ref = _swapped_mlp_logits(tiny_llama, tcs, ids, keep)
    with torch.no_grad():
        clean = tiny_llama(input_ids=ids).logits.float()
    tgt = ids[:, 1:].reshape(-1)
    ce = lambda z: float(F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), tgt))  # noqa: E731
    assert q.n_tokens == tgt.numel() and q.n_layers_replaced == 3
    assert q.ce_clean == pytest.approx(ce(clean), rel=1e-5)
    assert q.ce_replaced == pytest.approx(ce(ref), rel=1e-4)
    assert abs(q.ce_replaced - q.ce_clean) > 1e-3  # the random transcoders do change the model
    assert q.max_abs_logit_diff_with_error < 1e-4


def test_replacement_quality_refuses_non_transcoders(tiny_llama):
    with pytest.raises(ValueError, match="not an MLP transcoder"):
        replacement_quality(tiny_llama, [tiny_sae(layer=1, position="R")], torch.ones(1, 4, dtype=torch.long), {0})
    two = [tiny_sae(layer=1, position="TC"), tiny_sae(layer=1, position="TC", seed=1)]
    with pytest.raises(ValueError, match="two transcoders for one layer"):
        replacement_quality(tiny_llama, two, torch.ones(1, 4, dtype=torch.long), {0})


def test_demo_names():
    assert is_demo_transcoders("demo") and is_demo_transcoders("SmolLM2-135M-TC-320")
    assert is_demo_transcoders(DEMO_TC_DIR) and not is_demo_transcoders("L15R-8x")
    assert demo_tc_layer(demo_tc_name(7)) == 7 and demo_tc_layer("smollm2-135m-L30TC-320") is None


def test_demo_set_as_shipped():
    tcs = demo_transcoders()
    assert len(tcs) == 30
    for L, tc in enumerate(tcs):
        assert tc.hyperparams.hook_point_in == f"blocks.{L}.ln2.hook_normalized"
        assert tc.hyperparams.hook_point_out == f"blocks.{L}.hook_mlp_out"
        assert (tc.d_model, tc.d_sae, tc.name) == (576, 320, demo_tc_name(L))
    one = SAE.from_pretrained(demo_tc_name(5))
    assert torch.equal(one.W_dec, tcs[5].W_dec)
    size = sum(f.stat().st_size for f in DEMO_TC_DIR.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"the shipped set is {size / 2**20:.1f} MiB (limit 25)"
    results = json.loads((DEMO_TC_DIR / "results.json").read_text())
    assert [r["layer"] for r in results["layers"]] == list(range(30))


def test_demo_set_refuses_another_model(tiny_llama):
    with pytest.raises(IncompatibleModelError, match="need SmolLM2-135M"):
        demo_transcoders(tiny_llama)


@pytest.mark.smollm
@pytest.mark.slow
def test_demo_stores_mined_once_and_match_the_transcoders(smollm2, tmp_path, monkeypatch):
    """The stores' best activation of every feature equals the largest encode() over the
    same corpus windows, recomputed here by one capture pass; a second call mines nothing."""
    from llamascope_sdk import corpus
    from llamascope_sdk.core.sites import Site
    from llamascope_sdk.loading.capture import capture, keep_mask
    from llamascope_sdk.loading.models import special_ids
    from llamascope_sdk.trace import demo

    monkeypatch.setenv("LLAMASCOPE_CACHE", str(tmp_path))
    model, tok = smollm2
    stores = demo.demo_stores(model, tok)
    assert sorted(stores) == list(range(30)) and all(
        s.path is not None and s.path.parent == tmp_path / "features" for s in stores.values())
    tcs = demo.demo_transcoders(model)
    layers = (2, 7)
    best = {L: torch.zeros(320) for L in layers}
    specials = torch.tensor(sorted(special_ids(tok)))
    for b in corpus.batches(tok, demo.demo_corpus(), tokens=demo.STORE_TOKENS,
                            context=demo.STORE_CONTEXT, batch_size=8, rule="windows"):
        acts, _ = capture(model, [Site(L, "ln2_normalized") for L in layers], b.ids, b.valid)
        keep = keep_mask(b.ids, b.valid, specials)
        for L in layers:
            f = tcs[L].encode(acts[Site(L, "ln2_normalized")][keep])
            best[L] = torch.maximum(best[L], f.max(0).values)
    for L in layers:
        top = stores[L].top  # store format 3: feature i's examples are rows indptr[i]:indptr[i+1]
        stored = torch.tensor([float(top.values[top.indptr[i]]) if top.indptr[i + 1] > top.indptr[i]
                               else 0.0 for i in range(320)]).clamp_min(0)
        assert torch.allclose(stored, best[L], rtol=1e-4, atol=1e-5), L
        assert (best[L] > 0).sum() > 100  # most features fire on the excerpts

    def no_mining(*_a, **_k):
        raise AssertionError("mined again")

    monkeypatch.setattr(demo, "_mine", no_mining)
    again = demo.demo_stores(model, tok)
    assert torch.equal(again[7].top.values, stores[7].top.values)


def test_run_folder_name_of_many_saes_fits_a_file_name():
    from llamascope_sdk.training.loop import run_name

    names = [demo_tc_name(L) for L in range(30)]
    name = run_name(names)
    assert len(name) <= 200 and name.startswith(names[0] + "+29-more-")
    assert run_name(names[:29] + ["other"]) != name  # another set gets another folder
    assert run_name(names[:2]) == "+".join(names[:2])  # short runs keep the old name
