"""Ragged example slots: the K best spaced entries of every feature, stored only where the
feature fired, and the ragged :class:`Examples` they become.

Every entry has a unique 64-bit key (see :mod:`llamascope_sdk.mining.keys`); a feature keeps
the K largest keys among its firings that the spacing rule keeps
(:mod:`llamascope_sdk.mining.spacing`). The entries live in one growing table (key, feature,
document, position, the window's token ids and activations), not in F x K slots: a feature
that fired 3 times holds 3 rows, one that never fired none, so the memory grows with the
firings kept (at most F x K rows) and not with the number of features. Per feature only the
current K-th key (the floor a new firing must beat) and the number of rows are kept.

An entry that a better one evicts is marked dead (key -1) and its row reused once dead rows
outnumber live ones (the table is compacted in place); the order of rows never matters,
because :meth:`Slots.examples` sorts them once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamascope_sdk.mining.batch import Batch, Firings
from llamascope_sdk.mining.keys import INV
from llamascope_sdk.mining.spacing import spaced

__all__ = ["Examples", "Slots", "rank_by_feature"]


@dataclass
class Examples:
    """Contexts of every feature, ragged: feature i's examples are rows
    ``indptr[i]:indptr[i + 1]``, best first.

    ``values`` [n] activation at the centre token; ``doc``/``pos`` [n] where it came from
    (document index, token position in the document with BOS at 0); ``tokens`` [n, W] token
    ids of the window (-1 outside the sequence); ``acts`` [n, W] the feature's activation on
    every window token (0 at special tokens). The centre is at window index ``center``.
    """

    indptr: torch.Tensor  # [F + 1] int64
    values: torch.Tensor
    doc: torch.Tensor
    pos: torch.Tensor
    tokens: torch.Tensor
    acts: torch.Tensor
    center: int

    @property
    def d_sae(self) -> int:
        return int(self.indptr.numel()) - 1

    @property
    def width(self) -> int:
        return int(self.tokens.shape[1])

    def rows(self, i: int) -> range:
        """Rows of feature ``i``, best first."""
        return range(int(self.indptr[i]), int(self.indptr[i + 1]))

    def span(self, i: int) -> slice:
        """Feature ``i``'s rows as a slice (``values[span(i)]``)."""
        return slice(int(self.indptr[i]), int(self.indptr[i + 1]))

    def first(self, i: int) -> float:
        """Value of feature ``i``'s first (best) example; 0 when it has none."""
        lo, hi = int(self.indptr[i]), int(self.indptr[i + 1])
        return float(self.values[lo]) if hi > lo else 0.0

    def counts(self) -> torch.Tensor:
        """[F] number of examples of each feature."""
        return self.indptr[1:] - self.indptr[:-1]

    def best(self) -> torch.Tensor:
        """[F] value of each feature's first example (0 for a feature without any)."""
        has = self.counts() > 0
        out = torch.zeros(self.d_sae, dtype=self.values.dtype)
        out[has] = self.values[self.indptr[:-1][has]]
        return out

    @classmethod
    def from_dense(cls, values_FK: torch.Tensor, doc_FK: torch.Tensor, pos_FK: torch.Tensor,
                   tokens_FKW: torch.Tensor, acts_FKW: torch.Tensor, center: int) -> Examples:
        """From the [F, K] slots of a version-2 store (empty slots: ``doc == -1``, last)."""
        full = doc_FK >= 0
        counts = full.sum(1)
        indptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        return cls(indptr, values_FK[full], doc_FK[full], pos_FK[full], tokens_FKW[full],
                   acts_FKW[full], center)


def rank_by_feature(feat_N: torch.Tensor, key_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of entries by (feature, key descending) and each entry's rank in its feature:
    ``(order [N], rank [N])`` with ``rank[j]`` the rank of entry ``order[j]``."""
    o = torch.argsort(key_N, descending=True)
    o = o[torch.argsort(feat_N[o], stable=True)]
    f = feat_N[o]
    uniq, counts = torch.unique_consecutive(f, return_counts=True)
    start = (counts.cumsum(0) - counts).repeat_interleave(counts)
    return o, torch.arange(len(o), device=o.device) - start


class Slots:
    """The K largest spaced keys per feature, with where they came from and their windows."""

    _NAMES = ("keys", "feat", "doc", "pos", "tok", "act")

    def __init__(self, f: int, k: int, before: int, after: int, device: torch.device) -> None:
        self.f, self.k, self.before = f, k, before
        self.w = before + 1 + after
        self.gap = self.w  # the spacing rule: entries of one document at least a window apart
        self.offsets = torch.arange(-before, after + 1, device=device)
        self.device = device
        self._alloc(0)
        self.floor = torch.full((f,), -1, dtype=torch.long, device=device)
        self.count = torch.zeros(f, dtype=torch.long, device=device)

    def _alloc(self, cap: int) -> None:
        d = self.device
        self.keys = torch.full((cap,), -1, dtype=torch.long, device=d)
        self.feat = torch.zeros(cap, dtype=torch.long, device=d)
        self.doc = torch.zeros(cap, dtype=torch.long, device=d)
        self.pos = torch.zeros(cap, dtype=torch.long, device=d)
        self.tok = torch.empty((cap, self.w), dtype=torch.int32, device=d)
        self.act = torch.empty((cap, self.w), dtype=torch.float32, device=d)
        self.n = 0

    # ------------------------------------------------------------------ storage
    def nbytes(self) -> int:
        """Bytes held (the table's capacity, floors and counts)."""
        held = [getattr(self, n) for n in self._NAMES] + [self.floor, self.count]
        return sum(t.numel() * t.element_size() for t in held)

    def _compact(self) -> None:
        live = (self.keys[:self.n] >= 0).nonzero().squeeze(1)
        for name in self._NAMES:
            t = getattr(self, name)
            t[:len(live)] = t[live]
        self.keys[len(live):self.n] = -1
        self.n = len(live)

    def _reserve(self, extra: int) -> None:
        """Room for ``extra`` more rows: compact when dead rows are at least half, else grow."""
        cap = self.keys.numel()
        if self.n + extra <= cap:
            return
        dead = self.n - int(self.count.sum())
        if dead > 0 and dead >= self.n // 2:
            self._compact()
            if self.n + extra <= cap:
                return
        old = {name: getattr(self, name)[:self.n] for name in self._NAMES}
        n = self.n
        self._alloc(max(2 * cap, n + extra, 1024))
        for name, t in old.items():
            getattr(self, name)[:n] = t
        self.n = n

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live entries (checkpoints and the distributed merge)."""
        live = (self.keys[:self.n] >= 0).nonzero().squeeze(1)
        return {name: getattr(self, name)[live] for name in self._NAMES}

    def load(self, t: dict[str, torch.Tensor]) -> None:
        """Replace the entries by ``t`` (as from :meth:`tensors`; at most K per feature)."""
        n = int(t["keys"].numel())
        self._alloc(n)
        for name in self._NAMES:
            getattr(self, name)[:n] = t[name].to(self.device)
        self.n = n
        self.count = torch.bincount(self.feat[:n], minlength=self.f)
        self.floor = torch.full((self.f,), -1, dtype=torch.long, device=self.device)
        full = self.count >= self.k
        if bool(full.any()):
            low = torch.full_like(self.floor, torch.iinfo(torch.long).max)
            low.scatter_reduce_(0, self.feat[:n], self.keys[:n], reduce="amin")
            self.floor[full] = low[full]

    # ------------------------------------------------------------------ mining
    def offer(self, feat: torch.Tensor, key: torch.Tensor, row: torch.Tensor, batch: Batch,
              firings: Firings) -> None:
        """Candidates: feature ``feat`` [n], its ``key`` [n] at flat batch row ``row`` [n]
        (``b * T + t``); ``firings`` the batch's non-zero activations. Every document of the
        batch must be in it whole (:mod:`~llamascope_sdk.mining.open_docs`): the spacing rule
        is applied per (feature, document), on document positions."""
        m = key > self.floor[feat]
        feat, key, row = feat[m], key[m], row[m]
        if feat.numel() == 0:
            return
        if self.gap > 1:  # the spacing rule, within each (feature, document)
            b = row // batch.T
            _, doc = torch.unique(batch.doc, return_inverse=True)
            m = spaced(feat * batch.ids.shape[0] + doc[b], batch.start[b] + row % batch.T, key,
                       self.gap)
            feat, key, row = feat[m], key[m], row[m]
        o, rank = rank_by_feature(feat, key)
        o = o[rank < self.k]
        feat, key, row = feat[o], key[o], row[o]
        enter = self._admit(feat, key)
        self._append(feat[enter], key[enter], row[enter], batch, firings)

    def _admit(self, feat: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Which candidates enter (bool [n]); evicts the entries they beat and updates the
        features' counts and floors. Candidates: at most K per feature, above its floor."""
        uniq, ncand = torch.unique(feat, return_counts=True)
        full = self.count[uniq] + ncand >= self.k
        enter = torch.ones_like(feat, dtype=torch.bool)
        self.count[uniq[~full]] += ncand[~full]
        if not bool(full.any()):
            return enter
        hit = torch.zeros(self.f, dtype=torch.bool, device=feat.device)
        hit[uniq[full]] = True
        old = (hit[self.feat[:self.n]] & (self.keys[:self.n] >= 0)).nonzero().squeeze(1)
        cand = hit[feat].nonzero().squeeze(1)
        all_feat = torch.cat([self.feat[old], feat[cand]])
        all_key = torch.cat([self.keys[old], key[cand]])
        o, rank = rank_by_feature(all_feat, all_key)
        is_old = o < len(old)
        lose = rank >= self.k
        self.keys[old[o[is_old & lose]]] = -1
        enter[cand[o[~is_old & lose] - len(old)]] = False
        kth = rank == self.k - 1
        self.floor[all_feat[o[kth]]] = all_key[o[kth]]
        self.count[uniq[full]] = self.k
        return enter

    def _append(self, feat: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, batch: Batch,
                firings: Firings) -> None:
        n = feat.numel()
        if n == 0:
            return
        self._reserve(n)
        at = slice(self.n, self.n + n)  # new rows go to the end: slices, not scattered writes
        self.n += n
        b, t = rows // batch.T, rows % batch.T
        self.keys[at], self.feat[at] = key, feat
        self.doc[at] = batch.doc[b]
        self.pos[at] = batch.start[b] + t
        tw = t[:, None] + self.offsets  # [n, W]
        inside = (tw >= 0) & (tw < batch.length[b][:, None])
        src_rows = (b[:, None] * batch.T + tw.clamp(0, batch.T - 1)).view(-1)
        tok = batch.ids.reshape(-1).index_select(0, src_rows).view(-1, self.w)
        self.tok[at] = tok.masked_fill_(~inside, -1)
        self.act[at] = firings.windows(feat, rows, b * batch.T, b * batch.T + batch.length[b],
                                       self.before, self.w)

    def examples(self, by_value: bool) -> Examples:
        """Every feature's entries sorted: by key (top-N: activation, then earlier token), or
        with ``by_value`` by activation then corpus order (the sample)."""
        live = (self.keys[:self.n] >= 0).nonzero().squeeze(1)
        keys, feat = self.keys[live], self.feat[live]
        values = self.act[live, self.before]
        if by_value:
            keys = (values.contiguous().view(torch.int32).long() << 32) | (keys & INV)
        o, _ = rank_by_feature(feat, keys)
        idx = live[o]
        counts = torch.bincount(feat, minlength=self.f)
        indptr = torch.cat([torch.zeros(1, dtype=torch.long, device=counts.device), counts.cumsum(0)])
        return Examples(indptr.cpu(), values[o].cpu(), self.doc[idx].cpu(), self.pos[idx].cpu(),
                        self.tok[idx].cpu(), self.act[idx].cpu(), self.before)
