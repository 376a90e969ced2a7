"""Feature mining equals a brute-force computation over every materialised activation.

The reference below keeps every activation of a small corpus ([tokens, F], tokens in corpus
order) and selects with full stable sorts, so it shares no selection code with the miner
(which keeps running top-k over 64-bit keys batch by batch)."""

from __future__ import annotations

import pytest
import torch

from llamascope_sdk import corpus
from llamascope_sdk.core.hooks import capture_into, hooked
from llamascope_sdk.loading.compat import check_compatible
from llamascope_sdk.loading.models import special_ids
from llamascope_sdk.mining.mine import HIST_EDGES, mine, sample_priority, state_bytes
from llamascope_sdk.mining.state import Batch, MiningConfig, Tracker

from .conftest import CharTokenizer
from .test_hooks import synthetic_sae


# ---------------------------------------------------------------------------- reference
def materialise(model, tok, saes, docs, *, tokens, context, batch_size):
    """Every activation: {name: [N, F]} with rows in corpus order, plus per row its document,
    document position and corpus order, and ``seqs`` = per row its token id and the row range
    [lo, hi) of its sequence (documents are read whole, in windows: corpus.RULES["windows"])."""
    specials = torch.tensor(sorted(special_ids(tok)))
    rows: dict[str, list[tuple[int, torch.Tensor]]] = {n: [] for n in saes}
    seqs = {}
    for bt in corpus.batches(tok, docs, tokens=tokens, context=context, batch_size=batch_size,
                             rule="windows"):
        ids, length = bt.ids, bt.lengths
        for name, sae in saes.items():
            site_in, _ = check_compatible(model, sae)
            got = {}
            with torch.no_grad(), hooked(model, {site_in: capture_into(got, "x")}, stop_after_last=True):
                model(input_ids=ids, attention_mask=bt.valid.long(), use_cache=False)
            f = sae.encode(got["x"]).float()
            for b in range(ids.shape[0]):
                n = int(length[b])
                keep = ~torch.isin(ids[b, :n], specials)
                rows[name].append((int(bt.order[b]), f[b, :n] * keep[:, None]))
        for b in range(ids.shape[0]):
            seqs[int(bt.order[b])] = (int(bt.doc[b]), int(bt.pos[b]), ids[b, :int(length[b])].tolist())
    starts = sorted(seqs)
    doc_col = torch.tensor([seqs[o][0] for o in starts for _ in seqs[o][2]])
    pos_col = torch.tensor([seqs[o][1] + j for o in starts for j in range(len(seqs[o][2]))])
    order = torch.tensor([o + j for o in starts for j in range(len(seqs[o][2]))])
    assert torch.equal(order, torch.arange(len(order)))  # sequences tile the corpus order
    tok_col = torch.tensor([t for o in starts for t in seqs[o][2]])
    lo = torch.tensor([o for o in starts for _ in seqs[o][2]])
    hi = torch.tensor([o + len(seqs[o][2]) for o in starts for _ in seqs[o][2]])
    acts = {n: torch.cat([a for _, a in sorted(r, key=lambda x: x[0])]) for n, r in rows.items()}
    return acts, doc_col, pos_col, order, {"tok": tok_col, "lo": lo, "hi": hi, "by_start": seqs,
                                           "doc": doc_col, "pos": pos_col}, specials


def reference(A, doc_col, pos_col, order, seqs, specials, *, top_n, n_samples, before, after,
              example_context):
    """Top-N / sample / stats / histogram of [N, F] activations by full stable sorts and the
    spacing rule applied one firing at a time."""
    N, F = A.shape
    keep = ~torch.isin(seqs["tok"], specials)
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
    # Top-N: rows are in corpus order, so a stable descending sort puts earlier tokens first;
    # then the spacing rule, one firing at a time (within a document, on document positions).
    vals, idx = torch.sort(A.T, dim=1, descending=True, stable=True)
    out["top"] = [_spaced(idx[f][vals[f] > 0].tolist(), seqs, before + 1 + after)[:top_n]
                  for f in range(F)]
    # Samples: firings by priority, spaced, the first n_samples, then by activation and order.
    pri = sample_priority(order, torch.arange(F)).masked_fill(A.T <= 0, -1)
    ps, sidx = torch.sort(pri, dim=1, descending=True, stable=True)
    out["samples"] = []
    for f in range(F):
        kept = _spaced(sidx[f][ps[f] >= 0].tolist(), seqs, example_context)[:n_samples]
        out["samples"].append(sorted(kept, key=lambda r, f=f: (-float(A[r, f]), r)))
    return out


def _spaced(rows: list[int], seqs, gap: int) -> list[int]:
    """The spacing rule by hand: walk ``rows`` best first and keep a row unless a kept one of
    the same document lies closer than ``gap`` document positions."""
    kept: list[int] = []
    doc, pos = seqs["doc"].tolist(), seqs["pos"].tolist()
    for r in rows:
        if all(doc[k] != doc[r] or abs(pos[k] - pos[r]) >= gap for k in kept):
            kept.append(r)
    return kept


def check_examples(ex, ref_rows, A, doc_col, pos_col, seqs, before, after):
    """Compare with the reference's winners (row indices per feature, in order); windows are
    cut from the materialised corpus (rows of one sequence are contiguous, so row + offset is
    in it iff lo <= row + offset < hi)."""
    F = A.shape[1]
    assert ex.counts().tolist() == [len(r) for r in ref_rows]
    idx = torch.tensor([r for rows in ref_rows for r in rows], dtype=torch.long)
    feat = torch.tensor([f for f in range(F) for _ in ref_rows[f]], dtype=torch.long)
    assert torch.equal(ex.values, A[idx, feat])
    assert torch.equal(ex.doc, doc_col[idx]) and torch.equal(ex.pos, pos_col[idx])
    tok_col = seqs["tok"]
    rows = idx[:, None] + torch.arange(-before, after + 1)  # [n, W]
    inside = (rows >= seqs["lo"][idx][:, None]) & (rows < seqs["hi"][idx][:, None])
    rc = rows.clamp(0, A.shape[0] - 1)
    assert torch.equal(ex.tokens.long(), torch.where(inside, tok_col[rc], -1))
    assert torch.equal(ex.acts, torch.where(inside, A[rc, feat[:, None].expand_as(rc)], 0.0))


def check_all(res, A, doc_col, pos_col, order, seqs, specials, *, top_n, n_samples, before, after,
              example_context=64):
    ref = reference(A, doc_col, pos_col, order, seqs, specials, top_n=top_n, n_samples=n_samples,
                    before=before, after=after, example_context=example_context)
    assert res.n_tokens == res.stats.n_tokens
    torch.testing.assert_close(res.stats.frequency, ref["frequency"].float(), rtol=0, atol=0)
    torch.testing.assert_close(res.stats.mean, ref["mean"].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.stats.typical, ref["typical"].float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(res.hist, ref["hist"])
    check_examples(res.top, ref["top"], A, doc_col, pos_col, seqs, before, after)
    eb = (3 * example_context) // 4
    check_examples(res.samples, ref["samples"], A, doc_col, pos_col, seqs, eb, example_context - 1 - eb)
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
               window_after=3, example_context=9, nonactivating_pool=30, n_nonactivating=10,
               progress=False, **kw)
    A, doc_col, pos_col, order, seqs, specials = materialise(model, tok, saes, DOCS, batch_size=3, **kw)
    for name in saes:
        assert res[name].top.indptr.shape == (97,) and int(res[name].top.counts().max()) <= 5
        check_all(res[name], A[name], doc_col, pos_col, order, seqs, specials, top_n=5,
                  n_samples=6, before=4, after=3, example_context=9)
    # Every token of the 70-character document was read, in windows of BOS + 39 tokens, with
    # positions counted from the document's start.
    long_doc = DOCS.index("x" * 70)
    read = {(int(p), int(t)) for d, p, t in zip(doc_col, pos_col, seqs["tok"], strict=True)
            if int(d) == long_doc and int(t) != 1}
    assert read == {(j + 1, tok("x")["input_ids"][0]) for j in range(70)}
    assert res["R0"].read["tokens_read"] == int((seqs["tok"] != 1).sum())
    # Padding does not change activations: a sequence run alone gives the same values.
    name = "R0"
    site = check_compatible(model, saes[name])[0]
    off = sorted(seqs["by_start"])[3]
    toks = seqs["by_start"][off][2]
    got = {}
    with torch.no_grad(), hooked(model, {site: capture_into(got, "x")}, stop_after_last=True):
        model(input_ids=torch.tensor([toks]))
    alone = saes[name].encode(got["x"])[0]
    alone[0] = 0  # BOS
    torch.testing.assert_close(A[name][off:off + len(toks)], alone, rtol=1e-4, atol=1e-5)


def test_ties_go_to_the_earlier_document_and_windows_stop_at_edges():
    """Hand-made activations: three equal maxima in documents seen out of order."""
    F, T = 3, 6

    tr = Tracker(F, MiningConfig(top_n=2, n_samples=0, window_before=3, window_after=2,
                                 n_nonactivating=0), torch.device("cpu"))
    # documents 0, 1, 2 have lengths 6, 4, 5 -> corpus offsets 0, 6, 10
    def batch(docs, lengths, offs):
        ids = torch.zeros(len(docs), T, dtype=torch.long)
        for r, n in enumerate(lengths):
            ids[r, :n] = torch.arange(10 * (docs[r] + 1), 10 * (docs[r] + 1) + n)
            ids[r, 0] = 1  # BOS
        length = torch.tensor(lengths)
        keep = (torch.arange(T)[None] < length[:, None]) & (ids != 1)
        order = torch.tensor(offs)[:, None] + torch.arange(T)[None]
        return Batch(ids, keep, length, torch.tensor(docs), torch.zeros(len(docs), dtype=torch.long),
                     order, T), ids

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
    ex = tr.top.examples(by_value=False)
    f0, f1_ = ex.span(0), ex.span(1)
    assert ex.doc[f0].tolist() == [0, 1] and ex.pos[f0].tolist() == [4, 1]
    assert ex.values[f0].tolist() == [5.0, 5.0]
    assert ex.tokens[f0][0].tolist() == [11, 12, 13, 14, 15, -1]
    assert ex.acts[f0][0].tolist() == [0.0, 0.0, 1.5, 5.0, 0.0, 0.0]
    assert ex.tokens[f0][1].tolist() == [-1, -1, 1, 21, 22, 23]
    assert ex.acts[f0][1].tolist() == [0.0, 0.0, 0.0, 5.0, 0.0, 0.0]
    # feature 1: the BOS activation was dropped, the end-of-document one kept with its edge;
    # nothing else fired, so it holds one example (no empty slot), feature 2 none
    assert ex.doc[f1_].tolist() == [2] and ex.values[f1_].tolist() == [2.0]
    assert ex.tokens[f1_][0].tolist() == [31, 32, 33, 34, -1, -1]
    assert ex.counts().tolist() == [2, 1, 0]
    assert tr.fired.tolist() == [4, 1, 0]


def test_state_memory_grows_with_the_examples_kept_not_with_features_x_slots():
    """A state holds per feature only sums, histogram, floors and counts; examples are rows of
    a table that grows with what fired (issue 29.4). state_bytes() is the most it can reach."""
    from llamascope_sdk.mining.state import N_BINS, example_bytes

    cfg = MiningConfig(top_n=7, window_before=5, window_after=2, n_samples=30, deciles=10,
                       example_context=12, n_nonactivating=0, nonactivating_pool=0)
    tr = Tracker(10_000, cfg, torch.device("cpu"))
    empty = tr.nbytes()
    assert empty == 10_000 * (8 * N_BINS + 16) + 2 * 10_000 * 16  # no example held
    T = 8
    ids = torch.arange(3, 3 + T)[None]
    ids[0, 0] = 1
    acts = torch.zeros(1, T, 10_000)
    acts[0, 3, 17] = 2.0
    acts[0, 5, 9_999] = 1.0
    tr.update(acts, Batch(ids, ids != 1, torch.tensor([T]), torch.tensor([0]), torch.tensor([0]),
                          torch.arange(T)[None], T))
    live = {k: v for k, v in tr.tensors().items() if k.startswith("top.")}
    assert sorted(live["top.feat"].tolist()) == [17, 9_999]
    held = tr.nbytes() - empty
    # two firings: two rows each for top examples and samples, in tables of at least 1,024 rows
    assert held == 1024 * (example_bytes(8) + example_bytes(12))
    assert state_bytes(131072) == 131072 * (8 * 58 + 48 + 20 * (32 + 21 * 8) + 100 * (32 + 64 * 8)) \
        + 1000 * (24 + 64 * 4)


def test_empty_corpus_is_an_error(tiny_llama):
    ids = torch.randint(3, 99, (1, 10))
    ids[:, 0] = 1
    sae = synthetic_sae(tiny_llama, ids, 0, "R", d_sae=128, l0=8)
    with pytest.raises(ValueError, match="no non-special tokens"):
        mine(tiny_llama, CharTokenizer(), sae, ["", ""], tokens=100, context=64, progress=False)


# ---------------------------------------------------------------------------- SmolLM2 + demo
@pytest.mark.smollm
def test_demo_sae_mining_equals_brute_force_on_real_text(smollm2, corpus_dir):
    from llamascope_sdk.corpus import iter_documents
    from llamascope_sdk.loading.sae import SAE

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
    # The Shakespeare feature fires far more often on the Shakespeare documents.
    fires = A[sae.name][:, 4154] > 0
    shakespeare = doc_col < 25
    assert fires[shakespeare].float().mean() > 3 * fires[~shakespeare].float().mean()
    assert float(res.stats.frequency[4154]) > 0.1


# ---------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kw, message", [
    ({"tokens": 0}, "tokens=0 is not allowed: tokens must be an integer >= 1"),
    ({"tokens": -5}, "tokens=-5 is not allowed: tokens must be an integer >= 1"),
    ({"context": 0}, "context=0 is not allowed: context must be an integer >= 2"),
    ({"context": -3}, "context=-3 is not allowed: context must be an integer >= 2"),
    ({"context": 129}, "context=129 is longer than the model's window of 128 positions; use context <= 128"),
    ({"batch_size": 0}, "batch_size=0 is not allowed: batch_size must be an integer >= 1"),
    ({"batch_size": -1}, "batch_size=-1 is not allowed: batch_size must be an integer >= 1"),
    ({"top_n": 0}, "top_n=0 is not allowed: top_n must be an integer >= 1"),
    ({"tokens": 2**32}, "tokens=4294967296 is too many: at most 4294967294 per run"),
    ({"n_nonactivating": 50, "nonactivating_pool": 10}, "n_nonactivating=50 exceeds nonactivating_pool=10"),
])
def test_bad_arguments_are_refused_in_one_line_before_any_work(tiny_llama, kw, message, monkeypatch):
    from llamascope_sdk.base.errors import InputError
    from llamascope_sdk.mining import mine as mining_module

    ids = torch.randint(3, 99, (1, 10))
    sae = synthetic_sae(tiny_llama, ids, 0, "R", d_sae=64, l0=4)
    monkeypatch.setattr(mining_module, "capture", lambda *a, **k: pytest.fail("the model ran"))
    args = {"tokens": 100, "context": 64} | kw
    with pytest.raises(InputError) as exc:
        mine(tiny_llama, CharTokenizer(), sae, DOCS, progress=False, **args)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_absurd_top_n_says_the_memory_it_would_need(tiny_llama):
    from llamascope_sdk.base.errors import InputError
    from llamascope_sdk.mining.mine import _memory_available

    ids = torch.randint(3, 99, (1, 10))
    sae = synthetic_sae(tiny_llama, ids, 0, "R", d_sae=4608, l0=4)
    # at most one example per token read (100,000 by default): still ~86 GiB for 4,608 features
    need = state_bytes(4608, top_n=100_000)
    assert need > _memory_available(torch.device("cpu"))
    with pytest.raises(InputError) as exc:
        mine(tiny_llama, CharTokenizer(), sae, DOCS, top_n=10_000_000, context=64, progress=False)
    msg = str(exc.value)
    assert msg.startswith(f"top_n=10000000, n_samples=100 may need up to {need / 2**30:.1f} GiB "
                          "of mining state")
    assert "lower them" in msg and "\n" not in msg


@pytest.mark.parametrize("act_fn,gate,threshold,dtype", [
    ("jumprelu", "reference", 0.05, torch.float32),
    ("jumprelu", "saelens", 0.05, torch.float32),
    ("jumprelu", "reference", -0.3, torch.float32),  # a negative theta: encode can be < 0
    ("jumprelu", "reference", 0.05, torch.bfloat16),
    ("relu", "reference", 0.05, torch.float32),
    ("topk", "reference", 0.05, torch.float32),
])
def test_firings_are_the_positive_entries_of_encode(act_fn, gate, threshold, dtype):
    """mining.firings lists exactly (row, feature, value) of encode(x) > 0, row-major, without
    building encode's dense output."""
    from llamascope_sdk.mining.mine import firings

    from .helpers import tiny_sae

    sae = tiny_sae(threshold=max(threshold, 0.0), d_sae=512)
    with torch.no_grad():
        sae.threshold.fill_(threshold)
    sae.hyperparams = sae.hyperparams.model_copy(update={"act_fn": act_fn, "top_k": 20})
    sae.gate = gate
    sae = sae.to(dtype)
    x = (torch.randn(3, 40, 64, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    f = sae.encode(x).reshape(-1, 512)
    want_r, want_c = (f > 0).nonzero(as_tuple=True)
    assert len(want_r) > 50 and (f > 0).float().mean() < 0.6  # neither empty nor dense
    rows, cols, vals = firings(sae, x)
    assert torch.equal(rows, want_r) and torch.equal(cols, want_c)
    assert torch.equal(vals, f[want_r, want_c])


def test_firing_windows_equal_the_dense_gather():
    """Firings.windows reads a feature's activations around a row from the sparse firings; it
    equals slicing the dense [rows, F] tensor, with 0 outside the row's sequence."""
    from llamascope_sdk.mining.state import Firings

    g = torch.Generator().manual_seed(0)
    B, T, F, before, w = 4, 30, 50, 7, 11
    dense = torch.relu(torch.randn(B * T, F, generator=g) - 1.5)
    rows, cols = dense.nonzero(as_tuple=True)
    fir = Firings(rows, cols, dense[rows, cols], B * T)
    length = torch.tensor([30, 12, 25, 1])
    pick = torch.randint(0, len(rows), (200,), generator=g)
    row, feat = rows[pick], cols[pick]
    b = row // T
    lo, hi = b * T, b * T + length[b]
    got = fir.windows(feat, row, lo, hi, before, w)
    for i in range(len(pick)):
        for j in range(w):
            r = int(row[i]) - before + j
            want = float(dense[r, feat[i]]) if lo[i] <= r < hi[i] else 0.0
            assert float(got[i, j]) == want
