"""The spacing rule of mined examples (issue 29.3): a feature's top examples and decile samples
never come from overlapping windows of one sequence, and the kept set is exactly the best
spaced set, checked against brute force over every subset on constructed activations."""

from __future__ import annotations

import itertools
import random

import torch

from llamascope_sdk.mining.keys import INV, mix
from llamascope_sdk.mining.spacing import spaced
from llamascope_sdk.mining.state import Batch, MiningConfig, Tracker


def greedy_reference(group: list[int], pos: list[int], key: list[int], gap: int) -> list[bool]:
    """The sequential greedy: take keys from the largest, skip one too close to a taken one."""
    keep = [False] * len(key)
    for i in sorted(range(len(key)), key=lambda i: -key[i]):
        keep[i] = not any(keep[j] and group[j] == group[i] and abs(pos[j] - pos[i]) < gap
                          for j in range(len(key)))
    return keep


def best_spaced_set(firings: list[tuple[int, int, int]], gap: int, n: int) -> list[int]:
    """Brute force: of every set of pairwise spaced firings (sequence, position, key), the one
    whose keys sorted in descending order and cut at ``n`` are lexicographically largest."""
    best: tuple[int, ...] = ()
    for size in range(len(firings) + 1):
        for sub in itertools.combinations(firings, size):
            if all(a[0] != b[0] or abs(a[1] - b[1]) >= gap for a, b in itertools.combinations(sub, 2)):
                best = max(best, tuple(sorted((f[2] for f in sub), reverse=True))[:n])
    return list(best)


def test_spaced_equals_the_sequential_greedy_on_random_groups():
    rng = random.Random(0)
    for _ in range(300):
        n, gap = rng.randint(0, 50), rng.randint(1, 10)
        cells = rng.sample([(g, p) for g in range(3) for p in range(30)], n)
        key = rng.sample(range(10**6), n)
        got = spaced(torch.tensor([c[0] for c in cells], dtype=torch.long),
                     torch.tensor([c[1] for c in cells], dtype=torch.long),
                     torch.tensor(key, dtype=torch.long), gap)
        assert got.tolist() == greedy_reference([c[0] for c in cells], [c[1] for c in cells], key, gap)


def test_a_rising_chain_keeps_every_window_th_firing():
    # Activation rising along 100 adjacent tokens: the greedy keeps 99, 99-W, 99-2W, ...
    keep = spaced(torch.zeros(100, dtype=torch.long), torch.arange(100), torch.arange(100), 21)
    assert keep.nonzero().squeeze(1).tolist() == [15, 36, 57, 78, 99]


def _batch(ids: torch.Tensor, doc: list[int], start: list[int], first_order: list[int]) -> Batch:
    b, t = ids.shape
    order = torch.tensor(first_order)[:, None] + torch.arange(t)[None, :]
    keep = ids != 1  # BOS (id 1) is not a token
    return Batch(ids, keep, torch.full((b,), t), torch.tensor(doc), torch.tensor(start), order, t)


def _constructed(seed: int, rows: int = 4, T: int = 12, F: int = 3):
    """Activations with clusters of adjacent firings (the near-copies of issue 29)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (rows, T), generator=g)
    ids[:, 0] = 1
    acts = torch.zeros(rows, T, F)
    for f in range(F):
        for r in range(rows):
            c = int(torch.randint(1, T, (1,), generator=g))
            width = int(torch.randint(1, 5, (1,), generator=g))
            acts[r, c:c + width, f] = torch.rand(min(width, T - c), generator=g) * 5 + 0.1
    acts[:, 0] = 0  # nothing fires on BOS
    acts[:, :, 2] *= (torch.rand(rows, T, generator=g) > 0.5)  # a sparser feature
    return ids, acts


def _firings(acts: torch.Tensor, f: int, key_of) -> list[tuple[int, int, int]]:
    rows, T, _ = acts.shape
    return [(r, t, key_of(r, t, f)) for r in range(rows) for t in range(T) if acts[r, t, f] > 0]


def test_top_examples_and_samples_are_the_best_spaced_sets_over_batches():
    for seed in range(6):
        ids, acts = _constructed(seed)
        rows, T, F = acts.shape
        cfg = MiningConfig(top_n=3, window_before=2, window_after=1, n_samples=2,
                           example_context=4, nonactivating_pool=0, n_nonactivating=0)
        # two batches of two sequences each; rows 0-1 one document, 2-3 another
        tr = Tracker(F, cfg, torch.device("cpu"))
        for lo in (0, 2):
            tr.update(acts[lo:lo + 2], _batch(ids[lo:lo + 2], [lo // 2] * 2, [0, 100],
                                              [lo * T, (lo + 1) * T]))
        top, samples = tr.top.examples(by_value=False), tr.samples.examples(by_value=True)

        def top_key(r: int, t: int, f: int, acts=acts, T=T) -> int:
            return (int(acts[r, t, f].view(torch.int32)) << 32) | (INV - (r * T + t))

        def sample_key(r: int, t: int, f: int, T=T) -> int:
            return (int(mix(torch.tensor(r * T + t), torch.tensor(f))) << 32) | (INV - (r * T + t))

        for f in range(F):
            want_top = best_spaced_set(_firings(acts, f, top_key), cfg.window, 3)
            got = [top_key(int(d) * 2 + int(p >= 100), int(p) - 100 * int(p >= 100), f)
                   for d, p in zip(top.doc[top.rows(f)], top.pos[top.rows(f)], strict=True)]
            assert got == want_top
            want_s = best_spaced_set(_firings(acts, f, sample_key), 4, 2)
            cells = [(int(d) * 2 + int(p >= 100), int(p) - 100 * int(p >= 100))
                     for d, p in zip(samples.doc[samples.rows(f)], samples.pos[samples.rows(f)], strict=True)]
            assert sorted(sample_key(r, t, f) for r, t in cells) == sorted(want_s)
            # the sample is listed by activation, highest first
            vals = samples.values[samples.rows(f)].tolist()
            assert vals == sorted(vals, reverse=True)


def test_adjacent_firings_give_one_example_per_window():
    # One sequence, a feature firing on tokens 3, 4, 6, 7 (overlapping windows of one
    # passage, as tokens 362, 363, 365, 366 of issue 29) and on token 15: with 4-token
    # windows the top examples are 7 (the largest) and 15, never 3 or 4 next to 7.
    ids = torch.arange(20)[None, :] + 3
    ids[0, 0] = 1
    acts = torch.zeros(1, 20, 1)
    acts[0, [3, 4, 6, 7, 15], 0] = torch.tensor([2.0, 2.5, 2.7, 3.0, 1.0])
    cfg = MiningConfig(top_n=5, window_before=2, window_after=1, n_samples=0, nonactivating_pool=0,
                       n_nonactivating=0)
    tr = Tracker(1, cfg, torch.device("cpu"))
    tr.update(acts, _batch(ids, [0], [0], [0]))
    top = tr.top.examples(by_value=False)
    assert top.pos.tolist() == [7, 3, 15] and top.values.tolist() == [3.0, 2.0, 1.0]
    starts = top.pos - top.center
    assert all(abs(int(a) - int(b)) >= cfg.window for a, b in itertools.combinations(starts, 2))


# ---------------------------------------------------------------------------- document-wide
def _doc_corpus(seed: int, n_docs: int = 3, parts: int = 3, T: int = 10, F: int = 3):
    """Sequences of ``n_docs`` documents cut in ``parts`` windows of BOS + T - 1 tokens (the
    last window shorter), with a few firings per feature clustered around the seams between
    windows, where two firings of one document can be closer than a window while lying in
    two sequences. Returns [(doc, part, last, start, order0, ids [t], acts [t, F])]."""
    g = torch.Generator().manual_seed(seed)
    seqs, order = [], 0
    for d in range(n_docs):
        for p in range(parts):
            t = T if p < parts - 1 else T - 3
            ids = torch.randint(3, 50, (t,), generator=g)
            ids[0] = 1
            seqs.append([d, p, p == parts - 1, p * (T - 1), order, ids, torch.zeros(t, F)])
            order += t
    for f in range(F):
        for d in range(n_docs):
            for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
                # a seam's neighbourhood: the last 3 tokens of part p or the first 3 of p + 1
                p = int(torch.randint(0, parts - 1, (1,), generator=g))
                after = bool(torch.rand(1, generator=g) > 0.5)
                s = next(x for x in seqs if x[0] == d and x[1] == p + after)
                back = int(torch.randint(1, 4, (1,), generator=g))
                c = back if after else len(s[5]) - back
                s[6][c, f] = float(torch.rand(1, generator=g)) * 5 + 0.1
    return seqs


def _doc_batches(seqs, order: list[int], batch_size: int) -> list[tuple[torch.Tensor, Batch]]:
    """The sequences in the given order, ``batch_size`` rows a batch, right-padded."""
    out = []
    for lo in range(0, len(order), batch_size):
        part = [seqs[i] for i in order[lo:lo + batch_size]]
        T = max(len(s[5]) for s in part)
        ids = torch.zeros(len(part), T, dtype=torch.long)
        acts = torch.zeros(len(part), T, part[0][6].shape[1])
        for r, s in enumerate(part):
            ids[r, :len(s[5])], acts[r, :len(s[5])] = s[5], s[6]
        length = torch.tensor([len(s[5]) for s in part])
        keep = (ids != 1) & (torch.arange(T)[None, :] < length[:, None])
        batch = Batch(ids, keep, length, torch.tensor([s[0] for s in part]),
                      torch.tensor([s[3] for s in part]),
                      torch.tensor([s[4] for s in part])[:, None] + torch.arange(T)[None, :], T,
                      part=torch.tensor([s[1] for s in part]),
                      last=torch.tensor([s[2] for s in part]))
        out.append((acts, batch))
    return out


def _doc_firings(seqs, f: int, key_of) -> dict[tuple[int, int], int]:
    """{(document, document position): key} of feature ``f``'s firings."""
    return {(s[0], s[3] + t): key_of(s[6][t, f], s[4] + t, f)
            for s in seqs for t in range(len(s[5])) if s[6][t, f] > 0}


def _top_key(v: torch.Tensor, order: int, f: int) -> int:
    return (int(v.view(torch.int32)) << 32) | (INV - order)


def _sample_key(v: torch.Tensor, order: int, f: int) -> int:
    return (int(mix(torch.tensor(order), torch.tensor(f))) << 32) | (INV - order)


DOC_CFG = MiningConfig(top_n=2, window_before=2, window_after=1, n_samples=3, example_context=5,
                       nonactivating_pool=0, n_nonactivating=0)


def _check_against_brute_force(seqs, top, samples, F: int) -> None:
    for f in range(F):
        for ex, key_of, gap, n in ((top, _top_key, DOC_CFG.window, DOC_CFG.top_n),
                                   (samples, _sample_key, DOC_CFG.example_context, DOC_CFG.n_samples)):
            fired = _doc_firings(seqs, f, key_of)
            want = best_spaced_set([(d, p, k) for (d, p), k in fired.items()], gap, n)
            got = [fired[(int(d), int(p))] for d, p in
                   zip(ex.doc[ex.rows(f)], ex.pos[ex.rows(f)], strict=True)]
            assert sorted(got, reverse=True) == want, (f, gap)


def test_spacing_is_document_wide_and_exact_over_sequences_and_batches():
    # Three documents of three windows each, fed in the order of a sort pool (every
    # document's short last window first, then the full ones) two rows a batch, so each
    # document spans several batches and its last window comes before the others; the kept
    # examples are the best set spaced on DOCUMENT positions, checked against every subset.
    close = 0
    for seed in range(8):
        seqs = _doc_corpus(seed)
        F = seqs[0][6].shape[1]
        pool = sorted(range(len(seqs)), key=lambda i: len(seqs[i][5]))
        tr, held = Tracker(F, DOC_CFG, torch.device("cpu")), []
        for acts, batch in _doc_batches(seqs, pool, 2):
            tr.update(acts, batch)
            held.append(tr.open.rows)
        assert max(held) >= 3 and held[-1] == 0  # rows held between batches, none at the end
        tr.settle()
        _check_against_brute_force(seqs, tr.top.examples(by_value=False),
                                   tr.samples.examples(by_value=True), F)
        # The same corpus seen in another order and batching gives the same examples.
        tr2 = Tracker(F, DOC_CFG, torch.device("cpu"))
        for acts, batch in _doc_batches(seqs, list(reversed(range(len(seqs)))), 3):
            tr2.update(acts, batch)
        tr2.settle()
        for a, b in ((tr.top, tr2.top), (tr.samples, tr2.samples)):
            ea, eb = a.examples(by_value=False), b.examples(by_value=False)
            assert torch.equal(ea.indptr, eb.indptr) and torch.equal(ea.doc, eb.doc)
            assert torch.equal(ea.pos, eb.pos) and torch.equal(ea.acts, eb.acts)
        # the construction puts firings of one feature on both sides of a seam, closer than
        # a window: a sequence-wide rule would have kept both
        for f in range(F):
            pts = _doc_firings(seqs, f, _top_key)
            close += sum(1 for (d, p) in pts for (e, q) in pts
                         if d == e and 0 < q - p < DOC_CFG.window and (p - 1) // 9 != (q - 1) // 9)
    assert close > 10


def test_a_later_window_drops_a_kept_example_and_revives_the_one_it_had_dropped():
    # One document in three windows (positions 1-9, 10-18, 19-21), one feature, 4-token
    # windows, window 0 read first. Window 0 alone keeps 7 (3.0) and drops 4 (2.0); window 1
    # holds 9.0 at 10, which drops 7, so 4 comes back: 10, 19, 4 (a sequence-wide rule keeps
    # 10, 19, 7, and 7 is 3 positions from 10).
    acts_at = {4: 2.0, 7: 3.0, 10: 9.0, 13: 1.0, 19: 4.0}
    seqs, order = [], 0
    for p, t in ((0, 10), (1, 10), (2, 4)):
        ids = torch.arange(t) + 3
        ids[0] = 1
        a = torch.zeros(t, 1)
        for c in range(1, t):
            a[c, 0] = acts_at.get(p * 9 + c, 0.0)
        seqs.append([0, p, p == 2, p * 9, order, ids, a])
        order += t
    cfg = MiningConfig(top_n=5, window_before=2, window_after=1, n_samples=0,
                       nonactivating_pool=0, n_nonactivating=0)
    tr = Tracker(1, cfg, torch.device("cpu"))
    for acts, batch in _doc_batches(seqs, [0, 2, 1], 1):  # window 0, then 2, then 1
        tr.update(acts, batch)
    top = tr.top.examples(by_value=False)
    assert top.pos.tolist() == [10, 19, 4] and top.values.tolist() == [9.0, 4.0, 2.0]


def test_ranks_that_split_a_document_merge_to_the_one_process_result():
    # Two "ranks" (two trackers) read alternate batches, so every document is split between
    # them; sharing their open rows every 2 batches and at the end, each document settled
    # whole on rank doc % 2 (what merge.share_open does over torch.distributed), then merging
    # gives the one-process examples, and no rank holds a row twice.
    from llamascope_sdk.mining.merge import merge_slots

    for seed in range(4):
        seqs = _doc_corpus(seed, n_docs=4)
        F = seqs[0][6].shape[1]
        one = Tracker(F, DOC_CFG, torch.device("cpu"))
        ranks = [Tracker(F, DOC_CFG, torch.device("cpu")) for _ in range(2)]

        def share(final: bool, ranks=ranks) -> None:
            parts = [r.open.tensors() for r in ranks]
            for rank, r in enumerate(ranks):
                r.share(parts, 2, rank, final)

        held = []
        for i, (acts, batch) in enumerate(_doc_batches(seqs, list(range(len(seqs))), 2)):
            one.update(acts, batch)
            ranks[i % 2].update(acts, batch)
            if i % 2 == 1:
                share(False)
                cells = [(int(d), int(p)) for r in ranks
                         for d, p in zip(r.open.t["doc"], r.open.t["part"], strict=True)]
                assert len(cells) == len(set(cells))
                held.append(len(cells))
        one.settle()
        assert max(held) > 0  # documents still open were kept, once, between shares
        share(True)
        assert all(r.open.rows == 0 for r in ranks)
        for kind, k in (("top", DOC_CFG.top_n), ("samples", DOC_CFG.n_samples)):
            merged = merge_slots([getattr(r, kind).tensors() for r in ranks], k)
            ref = getattr(one, kind)
            got = Tracker(F, DOC_CFG, torch.device("cpu"))
            getattr(got, kind).load(merged)
            a, b = ref.examples(by_value=False), getattr(got, kind).examples(by_value=False)
            assert torch.equal(a.indptr, b.indptr) and torch.equal(a.doc, b.doc)
            assert torch.equal(a.pos, b.pos) and torch.equal(a.acts, b.acts)
            assert torch.equal(a.tokens, b.tokens)
