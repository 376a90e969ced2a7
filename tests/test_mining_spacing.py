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
