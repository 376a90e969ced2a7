"""evaluate() on the tiny random Llama (known answers, independent reference) and on SmolLM2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llamascope_sdk import SAE
from llamascope_sdk.base.errors import DownloadError, IncompatibleModelError
from llamascope_sdk.core import metrics as M
from llamascope_sdk.core.hyperparams import Hyperparams
from llamascope_sdk.evaluation.evaluate import EvalResult, evaluate, iter_documents, token_batches

from .conftest import CharTokenizer
from .helpers import raw_tensors, release_hyperparams

D = 64  # tiny_llama hidden size

def identity_sae(layer: int = 1, position: str = "R", d: int = D) -> SAE:
    """f = (relu(x), relu(-x)) and decoder rows (e_i, -e_i): reconstructs x exactly."""
    sae = SAE(Hyperparams.from_dict(release_hyperparams(layer=layer, position=position, d_model=d,
                                                        d_sae=2 * d, threshold=0.0)))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(layer: int = 1, position: str = "M") -> SAE:
    sae = SAE(Hyperparams.from_dict(release_hyperparams(layer=layer, position=position, d_model=D,
                                                        d_sae=128, threshold=0.0)))
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.zero_()
    return sae


def random_sae(layer: int = 1, position: str = "R", seed: int = 0) -> SAE:
    return SAE.from_raw(release_hyperparams(layer=layer, position=position, d_model=D, d_sae=256,
                                            threshold=0.05, norm_in=4.0), raw_tensors(D, 256, seed))


def ids_with_specials() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (2, 24), generator=g)
    ids[:, 0] = 1  # BOS
    ids[0, 10] = 2  # an EOS inside the sequence
    return ids


def _module(model, hook_point: str):
    layer, kind = int(hook_point.split(".")[1]), hook_point.split(".", 2)[2]
    block = model.model.layers[layer]
    return {"hook_resid_post": block, "hook_attn_out": block.self_attn, "hook_mlp_out": block.mlp}[kind]


def reference_run(model, ids: torch.Tensor, sae: SAE, replace,
                  exclude: torch.Tensor | None = None) -> tuple[float, float, float]:
    """(clean CE, spliced CE, KL) written out plainly for R/A/M: ``replace(y, keep)`` gives the
    spliced activation; BOS/EOS positions (and ``exclude``) stay clean and are not counted."""
    keep = ~torch.isin(ids, torch.tensor([0, 1, 2]))
    if exclude is not None:
        keep &= ~exclude
    mod = _module(model, sae.hyperparams.hook_point_out)

    def hook(_m, _a, out):
        y = out[0] if isinstance(out, tuple) else out
        new = torch.where(keep[..., None], replace(y), y)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    with torch.no_grad():
        clean = model(ids).logits.double().log_softmax(-1)
        handle = mod.register_forward_hook(hook)
        try:
            spliced = model(ids).logits.double().log_softmax(-1)
        finally:
            handle.remove()
    tgt, m = ids[:, 1:], keep[:, 1:]
    ce_c = -clean[:, :-1].gather(-1, tgt[..., None])[..., 0][m].mean()
    ce_s = -spliced[:, :-1].gather(-1, tgt[..., None])[..., 0][m].mean()
    kl = (clean.exp() * (clean - spliced)).sum(-1)[:, :-1][m].mean()
    return float(ce_c), float(ce_s), float(kl)


@pytest.mark.parametrize("position", ["R", "A", "M"])
def test_perfect_sae_gives_zero_delta_lm_and_kl(tiny_llama, position: str) -> None:
    res = evaluate(tiny_llama, CharTokenizer(), identity_sae(1, position), ids_with_specials(),
                   progress=False)["sae"]
    assert res.delta_lm_loss == pytest.approx(0.0, abs=1e-6)
    assert res.kl_div == pytest.approx(0.0, abs=1e-6)
    assert res.mse == pytest.approx(0.0, abs=1e-12)
    assert res.explained_variance_centred == pytest.approx(1.0)
    assert res.explained_variance_uncentred == pytest.approx(1.0)
    assert res.n_tokens == 2 * 24 - 3  # two BOS and one EOS excluded
    assert res.n_targets == 2 * 23 - 1


def test_zero_sae_gives_zero_ablation_loss(tiny_llama) -> None:
    ids = ids_with_specials()
    res = evaluate(tiny_llama, CharTokenizer(), zero_sae(1, "M"), ids, progress=False,
                   zero_ablation=True)["sae"]
    ce_clean, ce_zero, kl = reference_run(tiny_llama, ids, zero_sae(1, "M"), torch.zeros_like)
    assert res.ce_clean == pytest.approx(ce_clean, rel=1e-5)
    assert res.ce_spliced == pytest.approx(ce_zero, rel=1e-5)
    assert res.ce_zero_ablation == pytest.approx(ce_zero, rel=1e-5)
    assert res.delta_lm_loss == pytest.approx(ce_zero - ce_clean, abs=1e-5)
    assert res.kl_div == pytest.approx(kl, abs=1e-6)  # float32 sums over the vocabulary
    assert res.loss_recovered == pytest.approx(0.0, abs=1e-6)
    assert res.l0_mean == 0.0 and res.n_dead == 128 and res.frac_dead == 1.0


def test_exclude_norm_above_leaves_large_inputs_clean_and_uncounted(tiny_llama) -> None:
    """The two non-special positions with the largest input norm lie above the cut-off: they
    are spliced clean and left out of every metric (a zero SAE, so MSE = mean y^2 of the rest)."""
    ids, sae = ids_with_specials(), zero_sae(1, "R")
    seen = {}
    hook = tiny_llama.model.layers[1].register_forward_hook(
        lambda _m, _a, out: seen.setdefault("y", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        tiny_llama(ids)
    hook.remove()
    y, special = seen["y"], torch.isin(ids, torch.tensor([0, 1, 2]))
    norms = y.norm(dim=-1).masked_fill(special, -1.0)
    top = norms.flatten().topk(3).values
    cut = float(top[1] + top[2]) / 2
    big = norms > cut
    assert int(big.sum()) == 2
    res = evaluate(tiny_llama, CharTokenizer(), sae, ids, progress=False,
                   exclude_norm_above=cut)["sae"]
    assert res.n_excluded == 2 and res.exclude_norm_above == cut
    assert res.n_tokens == 2 * 24 - 3 - 2 and res.n_targets == 2 * 23 - 1 - 2
    assert res.mse == pytest.approx(float(y[~special & ~big].double().pow(2).mean()), rel=1e-6)
    ce_clean, ce_spliced, kl = reference_run(tiny_llama, ids, sae, torch.zeros_like, exclude=big)
    assert res.ce_clean == pytest.approx(ce_clean, rel=1e-5)
    assert res.ce_spliced == pytest.approx(ce_spliced, rel=1e-5)
    assert res.kl_div == pytest.approx(kl, abs=1e-6)
    everything = evaluate(tiny_llama, CharTokenizer(), sae, ids, progress=False,
                          exclude_norm_above=math.inf)["sae"]
    default = evaluate(tiny_llama, CharTokenizer(), sae, ids, progress=False)["sae"]
    assert everything.n_excluded == 0 and everything.to_dict() == default.to_dict()


@pytest.mark.parametrize(("layer", "position"), [(0, "R"), (1, "R"), (2, "M"), (2, "A")])
def test_random_sae_matches_plain_reference(tiny_llama, layer: int, position: str) -> None:
    """The spliced pass resumes at the SAE's layer; the reference runs the whole model."""
    ids = ids_with_specials()
    sae = random_sae(layer, position)
    res = evaluate(tiny_llama, CharTokenizer(), sae, ids, progress=False)["sae"]
    ce_clean, ce_spliced, kl = reference_run(tiny_llama, ids, sae, lambda y: sae(y).to(y.dtype))
    assert res.ce_clean == pytest.approx(ce_clean, rel=1e-5)
    assert res.ce_spliced == pytest.approx(ce_spliced, rel=1e-5)
    assert res.kl_div == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert res.kl_div > 1e-4  # a random SAE changes the next-token distribution
    assert all(type(m).__name__ == "LlamaDecoderLayer" for m in tiny_llama.model.layers)


def test_several_saes_share_one_clean_pass(tiny_llama) -> None:
    calls = []
    handle = tiny_llama.register_forward_pre_hook(lambda *_: calls.append(1))
    saes = {"r": random_sae(0, "R"), "tc": random_sae(1, "TC", seed=1), "a": random_sae(2, "A")}
    try:
        res = evaluate(tiny_llama, CharTokenizer(), saes, ids_with_specials(), progress=False)
        assert len(calls) == 1 + 3  # one clean pass, one spliced pass per SAE
        calls.clear()
        evaluate(tiny_llama, CharTokenizer(), saes, ids_with_specials(), progress=False,
                 zero_ablation=True)
        assert len(calls) == 1 + 6
    finally:
        handle.remove()
    assert list(res) == ["r", "tc", "a"]
    assert res["tc"].hook_point_in == "blocks.1.ln2.hook_normalized"
    assert res["tc"].hook_point_out == "blocks.1.hook_mlp_out"
    assert len({r.ce_clean for r in res.values()}) == 1


def test_include_special_counts_bos_and_eos(tiny_llama) -> None:
    ids = ids_with_specials()
    res = evaluate(tiny_llama, CharTokenizer(), identity_sae(), ids, progress=False,
                   include_special=True)["sae"]
    assert res.n_tokens == 48 and res.n_targets == 46 and res.include_special


def test_dead_dense_and_frequencies_are_consistent(tiny_llama, tmp_path) -> None:
    res = evaluate(tiny_llama, CharTokenizer(), identity_sae(), ids_with_specials(),
                   progress=False)["sae"]
    freq = res.feature_frequency
    assert freq is not None and freq.shape == (2 * D,)
    # each coordinate is either positive or negative: feature i and its mirror sum to 1
    torch.testing.assert_close(freq[:D] + freq[D:], torch.ones(D, dtype=torch.float64))
    assert res.l0_mean == pytest.approx(D)
    assert res.n_dense == int((freq > 0.1).sum()) and res.n_dead == int((freq == 0).sum())
    assert res.plot_frequencies(tmp_path / "f.png").stat().st_size > 0


def test_to_dict_is_strict_json(tiny_llama) -> None:
    res = evaluate(tiny_llama, CharTokenizer(), zero_sae(), ids_with_specials(), progress=False)
    d = res["sae"].to_dict()
    text = json.dumps(d, allow_nan=False)
    assert "feature_frequency" not in d and d["kl_direction"] == "KL(clean || spliced)"
    assert {"l0_mean", "explained_variance_centred", "explained_variance_uncentred", "mse",
            "delta_lm_loss", "kl_div", "n_dead", "n_dense"} <= set(json.loads(text))
    assert len(res["sae"].to_dict(frequencies=True)["feature_frequency"]) == 128
    assert isinstance(res["sae"], EvalResult)


def test_text_sources_budget_and_bos(tiny_llama, tmp_path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first para\nstill first\n \nsecond\n\n\nthird one\n")
    assert list(iter_documents(txt)) == ["first para\nstill first", "second", "third one"]
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "alpha"}\n"beta"\n\n{"text": "gamma"}\n')
    assert list(iter_documents(jl)) == ["alpha", "beta", "gamma"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x y", "z"]}), tmp_path / "a.parquet")
    assert list(iter_documents(tmp_path / "a.parquet")) == ["x y", "z"]
    with pytest.raises(FileNotFoundError):
        list(iter_documents(tmp_path / "missing.txt"))
    batches = list(token_batches(CharTokenizer(), iter_documents(txt), tokens=20, context=8,
                                 batch_size=2))
    assert sum(int(v.sum()) for _, v in batches) == 20
    for ids, valid in batches:
        assert (ids[:, 0] == 1).all() and ids.shape[1] <= 8
        assert (valid[:, :-1] >= valid[:, 1:]).all()  # right-padded
    res = evaluate(tiny_llama, CharTokenizer(), identity_sae(), txt, tokens=30, context=16,
                   progress=False)["sae"]
    assert res.n_sequences == 3 and res.n_tokens == 30 - 3


def test_pack_cuts_full_context_rows() -> None:
    docs = ["abcdef", "ghijklmnop", "qrstuvwxyz" * 3]
    batches = list(token_batches(CharTokenizer(), docs, tokens=100, context=12, batch_size=8,
                                 pack=True))
    ids, valid = batches[0]
    assert ids.shape[1] == 12 and valid.all() and (ids[:, 0] == 1).all()
    assert (ids == 2).sum() >= 2  # documents are EOS-separated


def test_hf_dataset_name_streams_through_datasets(monkeypatch) -> None:
    import datasets

    seen = {}

    def fake_load(name, split=None, streaming=False):
        seen.update(name=name, split=split, streaming=streaming)
        return [{"text": "one"}, {"text": "two"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert list(iter_documents("someone/corpus", split="validation")) == ["one", "two"]
    assert seen == {"name": "someone/corpus", "split": "validation", "streaming": True}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"body": "x"}])
    with pytest.raises(KeyError, match="text_field"):
        list(iter_documents("someone/corpus"))

    def missing(*_a, **_k):
        raise FileNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DownloadError, match="nobody/nothing"):
        list(iter_documents("nobody/nothing"))


def test_incompatible_models_raise_clear_errors(tiny_llama) -> None:
    with pytest.raises(IncompatibleModelError, match="max_position_embeddings=128"):
        evaluate(tiny_llama, CharTokenizer(), identity_sae(), ["abc"], context=8192, progress=False)
    with pytest.raises(IncompatibleModelError, match="d_model=576"):
        evaluate(tiny_llama, CharTokenizer(), identity_sae(d=576), ["abc"], progress=False)
    with pytest.raises(IncompatibleModelError, match="layer 7"):
        evaluate(tiny_llama, CharTokenizer(), identity_sae(layer=7), ["abc"], progress=False)


def test_long_context_up_to_model_window(tiny_llama) -> None:
    res = evaluate(tiny_llama, CharTokenizer(), random_sae(), ["lorem ipsum " * 40], tokens=256,
                   context=128, pack=True, progress=False)["sae"]
    assert res.context == 128 and res.n_sequences == 2 and math.isfinite(res.delta_lm_loss)


@pytest.mark.smollm
def test_smollm2_wikitext(smollm2, corpus_dir) -> None:
    model, tok = smollm2
    corpus = corpus_dir / "wikitext2-valid.txt"
    saes = [identity_sae(5, "R", d=576),
            SAE.from_raw(release_hyperparams(layer=9, position="TC", d_model=576, d_sae=1152,
                                             threshold=0.2, norm_in=24.0, norm_out=2.0),
                         raw_tensors(576, 1152, 3))]
    res = evaluate(model, tok, saes, corpus, tokens=120, context=48, progress=False)
    perfect, tc = res["sae"], res["sae#2"]
    assert perfect.delta_lm_loss == pytest.approx(0.0, abs=1e-5)
    assert perfect.kl_div == pytest.approx(0.0, abs=1e-5)
    assert 1.0 < perfect.ce_clean < 8.0  # a real LM on real text
    assert tc.n_tokens == perfect.n_tokens > 80 and math.isfinite(tc.delta_lm_loss)
    assert tc.dense_threshold == M.DENSE_FREQUENCY
    with pytest.raises(IncompatibleModelError, match="max_position_embeddings=8192"):
        evaluate(model, tok, saes[:1], corpus, context=16384, progress=False)


def test_layers_and_hooks_restored_after_an_error(tiny_llama, monkeypatch) -> None:
    from llamascope_sdk.evaluation import evaluate as evaluation

    def boom(_new):
        def hook(*_):
            raise RuntimeError("boom")
        return hook

    # transformers 5 installs its own output-capturing hooks the first time a model is asked for
    # hidden states (and keeps them), so the check is that evaluate leaves exactly what it found
    def hooks() -> dict[str, list[object]]:
        return {n: [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
                for n, m in tiny_llama.named_modules()}

    before = hooks()
    monkeypatch.setattr(evaluation, "replace_with", boom)
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(tiny_llama, CharTokenizer(), random_sae(2, "R"), ids_with_specials(), progress=False)
    assert all(type(m).__name__ == "LlamaDecoderLayer" for m in tiny_llama.model.layers)
    assert hooks() == before
