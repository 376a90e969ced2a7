"""Decile and non-activating examples (what explanation needs) against a brute-force
computation over every materialised activation, and the store's format versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llamascope_sdk.mining.mine import mine
from llamascope_sdk.mining.state import _mix
from llamascope_sdk.store.feature_store import FeatureStore, StoreVersionError

from .conftest import CharTokenizer
from .test_hooks import synthetic_sae
from .test_mining import DOCS, materialise, reference

KW = dict(tokens=400, context=40, batch_size=3)
CFG = dict(top_n=3, n_samples=20, deciles=5, example_context=8, n_nonactivating=6,
           nonactivating_pool=25)


@pytest.fixture(scope="module")
def mined(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(3, 99, (2, 24))
    ids[:, 0] = 1
    sae = synthetic_sae(tiny_llama, ids, 1, "R", d_sae=80, l0=6)
    res = mine(tiny_llama, CharTokenizer(), sae, DOCS, progress=False, **KW, **CFG)[sae.name]
    ref = materialise(tiny_llama, CharTokenizer(), {sae.name: sae}, DOCS, **KW)
    return sae, res, ref


def test_pool_is_the_highest_priority_contexts_and_fires_is_exact(mined):
    sae, res, (A, doc_col, pos_col, order, seqs, specials) = mined
    A = A[sae.name]
    tok_col = seqs["tok"]
    counted = ~torch.isin(tok_col, specials)
    # Reference pool: the 25 counted tokens with the highest priority(order, -1).
    pri = _mix(order, torch.tensor(-1)).masked_fill(~counted, -1)
    rows = torch.sort(pri, descending=True, stable=True).indices[:25]
    c = res.contexts
    fires = torch.stack([c.fires(i) for i in range(A.shape[1])])  # [F, R] from the lists
    assert torch.equal(c.order, order[rows]) and torch.equal(c.doc, doc_col[rows])
    assert torch.equal(c.pos, pos_col[rows])
    before, after = 6, 1  # 3/4 of the 8-token context before the centre
    for j, r in enumerate(rows.tolist()):  # the context stays inside its sequence
        lo = max(r - before, int(seqs["lo"][r]))
        hi = min(r + after, int(seqs["hi"][r]) - 1)
        assert torch.equal(fires[:, j], (A[lo:hi + 1] > 0).any(0))
        want = [-1] * (before - (r - lo)) + tok_col[lo:hi + 1].tolist() + [-1] * (after - (hi - r))
        assert c.tokens[j].tolist() == want


def test_store_gives_deciles_and_non_activating_examples(mined, tmp_path):
    sae, res, (A, doc_col, pos_col, order, seqs, specials) = mined
    A = A[sae.name]
    store = FeatureStore.from_result(res, CharTokenizer(), sae_spec="my-sae", corpus="docs")
    back = FeatureStore.load(store.save(tmp_path / "st"))
    assert back.meta["version"] == 4 and back.meta["deciles"] == 5
    assert back.meta["example_spacing"]["samples"] == 8 and back.meta["example_spacing"]["top"] == 21
    ref = reference(A, doc_col, pos_col, order, seqs, specials, top_n=3, n_samples=20, before=16,
                    after=4, example_context=8)["samples"]
    fired = (A > 0).sum(0)
    alive = (fired > 0).nonzero().squeeze(1)
    by_count = alive[fired[alive].argsort(stable=True)]
    n_neg = 0
    for i in [int(fired.argmax()), int(by_count[len(by_count) // 2]), int(by_count[0])]:
        bands = back.decile_examples(i)
        assert [b["decile"] for b in bands] == [5, 4, 3, 2, 1]
        got = [e["max"] for b in bands for e in b["examples"]]
        n = len(ref[i])  # the spaced sample (at most 20)
        assert got == [float(A[r, i]) for r in ref[i]] and got == sorted(got, reverse=True)
        assert [len(b["examples"]) for b in bands] == [round((q + 1) * n / 5) - round(q * n / 5)
                                                        for q in range(5)]
        for b in bands:
            if b["examples"]:
                assert (b["lo"], b["hi"]) == (b["examples"][-1]["max"], b["examples"][0]["max"])
            for e in b["examples"]:
                assert e["acts"][e["max_index"]] == e["max"] and len(e["tokens"]) <= 8
        neg = back.non_activating(i)
        c = res.contexts
        ok = [j for j in range(25) if not bool(c.fires(i)[j])]
        pri = [int(_mix(c.order[j], torch.tensor(i))) for j in ok]
        want = [ok[k] for k in sorted(range(len(ok)), key=lambda k: -pri[k])][:6]
        n_neg += len(neg)
        assert [(e["doc"], e["pos"]) for e in neg] == [(int(c.doc[j]), int(c.pos[j])) for j in want]
        for e in neg:  # the feature is zero on every token of the context
            r = int(((doc_col == e["doc"]) & (pos_col == e["pos"])).nonzero())
            lo = r - e["max_index"]
            assert float(A[lo:lo + len(e["tokens"]), i].abs().sum()) == 0.0
            assert set(e["acts"]) == {0.0}
    assert n_neg > 0
    json.dumps(back.decile_examples(0) + back.non_activating(0), allow_nan=False)


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("version", [2, 3])
def test_older_stores_read_as_they_did_and_save_as_version_4(tmp_path, version):
    """tests/data/store_v2 was written by the SDK at f0aa478 (format 2, [F, K] slots),
    tests/data/store_v3 at 268e887 (format 3, ragged); what that SDK read from each is in
    store_vN_expected.json."""
    old = FeatureStore.load(DATA / f"store_v{version}")
    assert old.meta["version"] == version
    want = json.loads((DATA / f"store_v{version}_expected.json").read_text())
    for i in range(old.d_sae):
        got = {"top": old.examples(i), "deciles": old.decile_examples(i),
               "non_activating": old.non_activating(i)}
        assert json.loads(json.dumps(got)) == want[str(i)], i
    new = FeatureStore.load(old.save(tmp_path / "v4"))
    assert new.meta["version"] == 4
    for i in range(new.d_sae):
        assert new.examples(i) == old.examples(i) and new.non_activating(i) == old.non_activating(i)
        assert new.decile_examples(i) == old.decile_examples(i)
    assert torch.equal(new.hist, old.hist) and new.hist.dtype == torch.long


def test_version_1_store_loads_and_refuses_deciles_with_the_re_mine_command(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(DATA / "store_v2", folder)
    v2 = FeatureStore.load(DATA / "store_v2")
    # A version-1 store: samples with the top examples' windows, no pool, no v2 keys.
    m = json.loads((folder / "manifest.json").read_text())
    (folder / "nonactivating.safetensors").unlink()
    (folder / "samples.safetensors").write_bytes((folder / "top.safetensors").read_bytes())
    m = {k: v for k, v in m.items() if k not in ("deciles", "example_context", "example_before",
                                                 "n_nonactivating", "nonactivating_pool")}
    m["version"] = 1
    m["sae_spec"], m["corpus"] = "my-sae", "docs.txt"
    m["files"] = [f for f in m["files"] if f != "nonactivating.safetensors"]
    (folder / "manifest.json").write_text(json.dumps(m))
    old = FeatureStore.load(folder)
    i = int(v2.top.counts().argmax())
    assert old.examples(i) == v2.examples(i) and old.examples(i)  # show still works
    assert old.samples.center == old.top.center == 3 and old.contexts is None
    with pytest.raises(StoreVersionError) as exc:
        old.decile_examples(0)
    msg = str(exc.value)
    assert "\n" not in msg and "store version 1" in msg
    assert msg.endswith(f"re-mine it: llamascope inspect --sae my-sae --dataset docs.txt --out {folder}")
    with pytest.raises(StoreVersionError):
        old.non_activating(0)
    m["version"] = 5
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="store version 5 is newer than this SDK reads"):
        FeatureStore.load(folder)


def test_examples_of_one_document_are_a_window_apart_and_the_scope_is_stated(mined, tmp_path):
    # A real mine (tiny Llama, DOCS in windows of 40 ids): no two top examples or samples of
    # a feature from one document are closer than their window, across sequences too,
    # although the feature fires on both sides of a window's edge closer than that.
    from llamascope_sdk.store.pages import feature_page, index_page

    sae, res, (A, doc_col, pos_col, order, seqs, specials) = mined
    A = A[sae.name]
    close_firings = 0
    for ex, gap in ((res.top, 21), (res.samples, 8)):
        for i in range(ex.d_sae):
            cells = list(zip(ex.doc[ex.span(i)].tolist(), ex.pos[ex.span(i)].tolist(), strict=True))
            assert all(d != e or abs(p - q) >= gap for k, (d, p) in enumerate(cells)
                       for e, q in cells[k + 1:]), i
            r = (A[:, i] > 0).nonzero().squeeze(1)
            lo = seqs["lo"][r]
            same = (doc_col[r][:, None] == doc_col[r][None, :]) & (lo[:, None] != lo[None, :])
            close_firings += int((same & ((pos_col[r][:, None] - pos_col[r][None, :]).abs() < gap)).sum())
    assert close_firings > 0
    store = FeatureStore.from_result(res, CharTokenizer(), sae_spec="my-sae", corpus="docs")
    back = FeatureStore.load(store.save(tmp_path / "st"))
    assert back.meta["example_spacing"]["scope"] == "document"
    line = "at least a window apart within a document (top: 21 tokens, samples: 8)"
    assert line in feature_page(back, 0) and line in index_page(back, [0])
    # A store mined before the rule was document-wide says so, also once saved again.
    old = FeatureStore.load(FeatureStore.load(DATA / "store_v3").save(tmp_path / "v3"))
    assert old.meta["example_spacing"]["scope"] == "sequence"
    assert "within a sequence (top: 5 tokens" in feature_page(old, 0)
