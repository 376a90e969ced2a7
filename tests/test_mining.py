"""Feature mining equals a brute-force computation over every materialised activation.

The reference below keeps every activation of a small corpus ([tokens, F], tokens in corpus
order) and selects with full stable sorts, so it shares no selection code with the miner
(which keeps running top-k over 64-bit keys batch by batch)."""

from __future__ import annotations

import pytest
import torch

from llamascope_sdk.compat import check_compatible
from llamascope_sdk.hooks import capture_into, hooked
from llamascope_sdk.mining import (
    HIST_EDGES,
    _Batch,
    _Tracker,
    doc_batches,
    mine,
    sample_priority,
    sequences,
    state_bytes,
)
from llamascope_sdk.models import special_ids

from .conftest import CharTokenizer
from .test_hooks import synthetic_sae


# ---------------------------------------------------------------------------- reference
def materialise(model, tok, saes, docs, *, tokens, context, batch_size):
    """Every activation: {name: [N, F]} with rows in corpus order, plus doc/pos/order/ids."""
    specials = torch.tensor(sorted(special_ids(tok)))
    rows: dict[str, list[tuple[int, torch.Tensor]]] = {n: [] for n in saes}
    seqs = {}
    for ids, length, doc, off in doc_batches(tok, docs, tokens=tokens, context=context,
                                              batch_size=batch_size):
        for name, sae in saes.items():
            site_in, _ = check_compatible(model, sae)
            got = {}
            valid = torch.arange(ids.shape[1])[None] < length[:, None]
            with torch.no_grad(), hooked(model, {site_in: capture_into(got, "x")}, stop_after_last=True):
                model(input_ids=ids, attention_mask=valid.long(), use_cache=False)
            f = sae.encode(got["x"]).float()
            for b in range(ids.shape[0]):
                n = int(length[b])
                keep = ~torch.isin(ids[b, :n], specials)
                rows[name].append((int(off[b]), f[b, :n] * keep[:, None]))
        for b in range(ids.shape[0]):
            seqs[int(doc[b])] = (int(off[b]), ids[b, :int(length[b])].tolist())
    docs_sorted = sorted(seqs)
    doc_col = torch.tensor([d for d in docs_sorted for _ in seqs[d][1]])
    pos_col = torch.tensor([p for d in docs_sorted for p in range(len(seqs[d][1]))])
    order = torch.tensor([seqs[d][0] + p for d in docs_sorted for p in range(len(seqs[d][1]))])
    acts = {n: torch.cat([a for _, a in sorted(r, key=lambda x: x[0])]) for n, r in rows.items()}
    return acts, doc_col, pos_col, order, seqs, specials


def reference(A, doc_col, pos_col, order, seqs, specials, *, top_n, n_samples, before, after):
    """Top-N / sample / stats / histogram of [N, F] activations by full stable sorts."""
    N, F = A.shape
    keep = ~torch.isin(torch.tensor([seqs[int(d)][1][int(p)] for d, p in zip(doc_col, pos_col, strict=True)]),
                       specials)
    n_tokens = int(keep.sum())
    out = {"mean": A.double().sum(0) / n_tokens,
           "frequency": (A > 0).double().sum(0) / n_tokens}
    fired = (A > 0).sum(0)
    out["typical"] = torch.where(fired > 0, A.double().sum(0) / fired.clamp(min=1), 0)
    # Histogram: bin = number of edges strictly below the value.
    hist = torch.zeros(F, len(HIST_EDGES) + 1, dtype=torch.long)
    r, c = (A > 0).nonzero(as_tuple=True)
    b = (A[r, c][:, None] > HIST_EDGES[None, :]).sum(1)
    hist.index_put_((c, b), torch.ones_like(b), accumulate=True)
    out["hist"] = hist
    # Top-N: rows are in corpus order, so a stable descending sort puts earlier tokens first.
    vals, idx = torch.sort(A.T, dim=1, descending=True, stable=True)
    out["top"] = (vals[:, :top_n], idx[:, :top_n])
    # Samples: the n_samples firings with the highest priority, then sorted by activation.
    pri = sample_priority(order, torch.arange(F)).masked_fill(A.T <= 0, -1)
    _, sidx = torch.sort(pri, dim=1, descending=True, stable=True)
    sidx = sidx[:, :n_samples]
    sval = A.T.gather(1, sidx).masked_fill(pri.gather(1, sidx) < 0, 0)
    # value descending, then corpus order (= row index) ascending
    perm = torch.argsort(sidx, dim=1, stable=True)
    sidx, sval = sidx.gather(1, perm), sval.gather(1, perm)
    perm = torch.argsort(sval, dim=1, descending=True, stable=True)
    out["samples"] = (sval.gather(1, perm), sidx.gather(1, perm))
    return out


def check_examples(ex, ref_vals, ref_idx, A, doc_col, pos_col, seqs, before, after):
    """Compare with the reference's winners; windows are cut from the materialised corpus
    (rows of one document are contiguous, so row + offset is in it iff 0 <= pos + offset < len)."""
    F = A.shape[1]
    empty = ref_vals <= 0
    assert torch.equal(ex.values, ref_vals.masked_fill(empty, 0))
    assert torch.equal(ex.doc, doc_col[ref_idx].masked_fill(empty, -1))
    assert torch.equal(ex.pos, pos_col[ref_idx].masked_fill(empty, -1))
    tok_col = torch.tensor([t for d in sorted(seqs) for t in seqs[d][1]])
    doc_len = torch.tensor([len(seqs[int(d)][1]) for d in doc_col])
    off = torch.arange(-before, after + 1)
    rows = ref_idx[..., None] + off  # [F, K, W]
    p = pos_col[ref_idx][..., None] + off
    inside = (p >= 0) & (p < doc_len[ref_idx][..., None]) & ~empty[..., None]
    rc = rows.clamp(0, A.shape[0] - 1)
    feat = torch.arange(F)[:, None, None].expand_as(rc)
    assert torch.equal(ex.tokens, torch.where(inside, tok_col[rc], -1))
    assert torch.equal(ex.acts, torch.where(inside, A[rc, feat], 0.0))


def check_all(res, A, doc_col, pos_col, order, seqs, specials, *, top_n, n_samples, before, after):
    ref = reference(A, doc_col, pos_col, order, seqs, specials, top_n=top_n, n_samples=n_samples,
                    before=before, after=after)
    assert res.n_tokens == res.stats.n_tokens
    torch.testing.assert_close(res.stats.frequency, ref["frequency"].float(), rtol=0, atol=0)
    torch.testing.assert_close(res.stats.mean, ref["mean"].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.stats.typical, ref["typical"].float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(res.hist, ref["hist"])
    check_examples(res.top, *ref["top"], A, doc_col, pos_col, seqs, before, after)
    check_examples(res.samples, *ref["samples"], A, doc_col, pos_col, seqs, before, after)
    return ref


# ---------------------------------------------------------------------------- tiny model
DOCS = ["the cat sat on the mat", "a", "", "hello world, hello again and again",
        "zzzz zzzz zzzz", "the cat sat on the mat", "short", "x" * 70,
        "Mining keeps the top examples of every feature at once.", "end of corpus here"]


def test_mining_equals_brute_force_for_r_a_m_tc_in_one_pass(tiny_llama):
    model, tok = tiny_llama, CharTokenizer()
    ids = torch.randint(3, 99, (2, 24))
    ids[:, 0] = 1
    saes = {f"{pos}{layer}": synthetic_sae(model, ids, layer, pos, d_sae=96, seed=layer, l0=12)
            for layer, pos in [(0, "R"), (1, "A"), (1, "M"), (2, "TC")]}
    kw = dict(tokens=400, context=40)
    res = mine(model, tok, saes, DOCS, batch_size=3, top_n=5, n_samples=6, window_before=4,
               window_after=3, progress=False, **kw)
    A, doc_col, pos_col, order, seqs, specials = materialise(model, tok, saes, DOCS, batch_size=3, **kw)
    for name in saes:
        assert res[name].top.values.shape == (96, 5)
        check_all(res[name], A[name], doc_col, pos_col, order, seqs, specials, top_n=5,
                  n_samples=6, before=4, after=3)
    # The documents are the corpus's, cut to the budget, BOS first, indices kept (doc 2 is empty).
    seq = list(sequences(tok, DOCS, tokens=400, context=40))
    assert [s[0] for s in seq] == [i for i, d in enumerate(DOCS) if d][:len(seq)]
    assert seq[0][2] == [1, *tok(DOCS[0])["input_ids"]]
    assert sum(len(s[2]) for s in seq) == 400 or seq[-1][0] == len(DOCS) - 1
    # Padding does not change activations: a document run alone gives the same values.
    name = "R0"
    site = check_compatible(model, saes[name])[0]
    off, toks = seqs[3]
    got = {}
    with torch.no_grad(), hooked(model, {site: capture_into(got, "x")}, stop_after_last=True):
        model(input_ids=torch.tensor([toks]))
    alone = saes[name].encode(got["x"])[0]
    alone[0] = 0  # BOS
    torch.testing.assert_close(A[name][off:off + len(toks)], alone, rtol=1e-4, atol=1e-5)


def test_ties_go_to_the_earlier_document_and_windows_stop_at_edges():
    """Hand-made activations: three equal maxima in documents seen out of order."""
    F, T = 3, 6

    class Sae:
        d_sae = F
        device = torch.device("cpu")

    tr = _Tracker(Sae(), top_n=2, n_samples=0, before=3, after=2, device=torch.device("cpu"))
    # documents 0, 1, 2 have lengths 6, 4, 5 -> corpus offsets 0, 6, 10
    def batch(docs, lengths, offs):
        ids = torch.zeros(len(docs), T, dtype=torch.long)
        for r, n in enumerate(lengths):
            ids[r, :n] = torch.arange(10 * (docs[r] + 1), 10 * (docs[r] + 1) + n)
            ids[r, 0] = 1  # BOS
        length = torch.tensor(lengths)
        keep = (torch.arange(T)[None] < length[:, None]) & (ids != 1)
        order = torch.tensor(offs)[:, None] + torch.arange(T)[None]
        return _Batch(ids, keep, length, torch.tensor(docs), order, T), ids

    # batch 1: documents 2 and 0 (sorted by length, as doc_batches does)
    b1, ids1 = batch([2, 0], [5, 6], [10, 0])
    f1 = torch.zeros(2, T, F)
    f1[0, 3, 0] = 5.0       # doc 2 pos 3
    f1[1, 4, 0] = 5.0       # doc 0 pos 4
    f1[1, 3, 0] = 1.5       # a neighbour inside doc 0's window
    f1[1, 0, 1] = 9.0       # BOS: special, never counted
    f1[0, 4, 1] = 2.0       # doc 2 pos 4 = last token: window runs past the end
    tr.update(f1, b1)
    # batch 2: document 1, whose pos 1 ties too
    b2, _ = batch([1], [4], [6])
    f2 = torch.zeros(1, T, F)
    f2[0, 1, 0] = 5.0       # doc 1 pos 1: window starts before the document
    f2[0, 5, 0] = 7.0       # padding (length 4): never counted
    tr.update(f2, b2)
    ex = tr.top.examples(3)
    assert ex.doc[0].tolist() == [0, 1] and ex.pos[0].tolist() == [4, 1]
    assert ex.values[0].tolist() == [5.0, 5.0]
    assert ex.tokens[0, 0].tolist() == [11, 12, 13, 14, 15, -1]
    assert ex.acts[0, 0].tolist() == [0.0, 0.0, 1.5, 5.0, 0.0, 0.0]
    assert ex.tokens[0, 1].tolist() == [-1, -1, 1, 21, 22, 23]
    assert ex.acts[0, 1].tolist() == [0.0, 0.0, 0.0, 5.0, 0.0, 0.0]
    # feature 1: the BOS activation was dropped, the end-of-document one kept with its edge
    assert ex.doc[1].tolist() == [2, -1] and ex.values[1].tolist() == [2.0, 0.0]
    assert ex.tokens[1, 0].tolist() == [31, 32, 33, 34, -1, -1]
    assert tr.fired.tolist() == [4, 1, 0]


def test_state_bound_is_independent_of_corpus_size():
    assert state_bytes(131072) == 131072 * (36 * (24 + 21 * 12) + 8 * 58 + 16)
    assert state_bytes(131072) < 1.4e9
    assert state_bytes(4608) < 50 * 2**20


def test_empty_corpus_is_an_error(tiny_llama):
    ids = torch.randint(3, 99, (1, 10))
    ids[:, 0] = 1
    sae = synthetic_sae(tiny_llama, ids, 0, "R", d_sae=128, l0=8)
    with pytest.raises(ValueError, match="no non-special tokens"):
        mine(tiny_llama, CharTokenizer(), sae, ["", ""], tokens=100, progress=False)


# ---------------------------------------------------------------------------- SmolLM2 + demo
@pytest.mark.smollm
def test_demo_sae_mining_equals_brute_force_on_real_text(smollm2, corpus_dir):
    from llamascope_sdk.corpus import iter_documents
    from llamascope_sdk.sae import SAE

    model, tok = smollm2
    sae = SAE.from_pretrained("demo")
    docs = (list(iter_documents(corpus_dir / "tinyshakespeare.txt"))[:25]
            + list(iter_documents(corpus_dir / "wikitext2-valid.txt"))[:6])
    kw = dict(tokens=1500, context=64)
    res = mine(model, tok, sae, docs, batch_size=8, top_n=4, n_samples=4, window_before=5,
               window_after=2, progress=False, **kw)[sae.name]
    A, doc_col, pos_col, order, seqs, specials = materialise(model, tok, {sae.name: sae}, docs,
                                                             batch_size=8, **kw)
    check_all(res, A[sae.name], doc_col, pos_col, order, seqs, specials, top_n=4, n_samples=4,
              before=5, after=2)
    # The Shakespeare feature fires on the Shakespeare documents.
    assert int(res.top.doc[4154, 0]) < 25 and float(res.stats.frequency[4154]) > 0.1
