"""The pool of random contexts (non-activating examples): a uniform sample of R contexts of
the corpus shared by all features, and for each context the features that fire anywhere in
it, as a list (not an F x R table: its size grows with the firings in the R contexts).

The pool keeps the R counted tokens with the largest keys ``priority(order, -1) << 32 |
(2^32-1 - order)`` (see :mod:`llamascope_sdk.mining.keys`), so it does not depend on batch
order or on how batches are split between processes. A feature's non-activating examples are
the contexts whose list does not hold it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamascope_sdk.mining.batch import Batch
from llamascope_sdk.mining.keys import INV, key_order, mix

#: The "feature" whose priorities draw the pool of random contexts.
POOL_SALT = -1

__all__ = ["Contexts", "Pool", "POOL_SALT", "assign"]


@dataclass
class Contexts:
    """The pool of random contexts: ``tokens`` [R, W], ``doc``/``pos``/``order`` [R] of the
    centre token (-1: empty); the features firing somewhere in context j are
    ``feature[fires_ptr[j]:fires_ptr[j + 1]]`` (ascending)."""

    tokens: torch.Tensor
    doc: torch.Tensor
    pos: torch.Tensor
    order: torch.Tensor
    fires_ptr: torch.Tensor  # [R + 1] int64
    feature: torch.Tensor  # [nnz] int64
    center: int

    def fires(self, i: int) -> torch.Tensor:
        """bool [R]: feature ``i`` is non-zero somewhere in each context."""
        r = self.doc.numel()
        ctx = torch.repeat_interleave(torch.arange(r), self.fires_ptr[1:] - self.fires_ptr[:-1])
        out = torch.zeros(r, dtype=torch.bool)
        out[ctx[self.feature == i]] = True
        return out

    @classmethod
    def from_dense(cls, tokens: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor,
                   order: torch.Tensor, fires_FR: torch.Tensor, center: int) -> Contexts:
        """From a version-2 store's [F, R] table."""
        ctx, feat = fires_FR.T.nonzero(as_tuple=True)  # row-major: context, then feature
        counts = torch.bincount(ctx, minlength=fires_FR.shape[1])
        ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        return cls(tokens, doc, pos, order, ptr, feat, center)


def assign(old: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge candidate keys ``cand`` [R, C] (-1 = none) into slots ``old`` [R, K].

    Returns (row, slot, column) of every candidate that enters: it replaces an evicted or
    empty slot; kept slots are not touched. No sort: the j-th entering candidate of a row (in
    column order) takes the row's j-th free slot (in slot order), both listed by ``nonzero``.
    """
    r, k = old.shape
    allk = torch.cat([old, cand], dim=1)
    _, ti = allk.topk(k, dim=1, sorted=False)
    chosen = torch.zeros_like(allk, dtype=torch.bool).scatter_(1, ti, True)
    free = ~chosen[:, :k]
    new = chosen[:, k:] & (cand >= 0)
    n_new = new.sum(1)
    fr, fs = free.nonzero(as_tuple=True)  # row-major: rows ascending, slots ascending
    rank = free.cumsum(1).sub_(1).view(-1)[fr * k + fs]  # j: the j-th free slot of its row
    use = rank < n_new[fr]
    nr, nc = new.nonzero(as_tuple=True)
    return nr, fs[use], nc


class Pool:
    """R random contexts and, per context, the features firing in it (pairs)."""

    def __init__(self, r: int, before: int, after: int, device: torch.device) -> None:
        self.r, self.before = r, before
        self.offsets = torch.arange(-before, after + 1, device=device)
        self.keys = torch.full((1, r), -1, dtype=torch.long, device=device)
        self.doc = torch.full((r,), -1, dtype=torch.long, device=device)
        self.pos = torch.full((r,), -1, dtype=torch.long, device=device)
        self.tok = torch.full((r, before + 1 + after), -1, dtype=torch.int32, device=device)
        # (slot, feature) pairs: feature fires in the context held by slot
        self.pair_slot = torch.zeros(0, dtype=torch.long, device=device)
        self.pair_feat = torch.zeros(0, dtype=torch.long, device=device)
        self._distinct = 0  # pairs after the last removal of duplicates

    def nbytes(self) -> int:
        held = (self.keys, self.doc, self.pos, self.tok, self.pair_slot, self.pair_feat)
        return sum(t.numel() * t.element_size() for t in held)

    def tensors(self) -> dict[str, torch.Tensor]:
        self._dedupe()  # checkpoints and merges hold each pair once
        return {"keys": self.keys, "doc": self.doc, "pos": self.pos, "tok": self.tok,
                "pair_slot": self.pair_slot, "pair_feat": self.pair_feat}

    def load(self, t: dict[str, torch.Tensor]) -> None:
        for name in ("keys", "doc", "pos", "tok"):
            getattr(self, name).copy_(t[name])
        self.pair_slot = t["pair_slot"].to(self.keys.device).clone()
        self.pair_feat = t["pair_feat"].to(self.keys.device).clone()

    def offer(self, batch: Batch, rows_nz: torch.Tensor, cols_nz: torch.Tensor) -> None:
        """``rows_nz``/``cols_nz``: the batch's firings (flat row ascending, feature)."""
        order = batch.order.reshape(-1)
        pri = mix(order, torch.tensor(POOL_SALT, device=order.device))
        key = torch.where(batch.keep.reshape(-1), (pri << 32) | (INV - order), -1)
        cand_rows = (key > self.keys.min()).nonzero().squeeze(1)
        if cand_rows.numel() == 0:
            return
        ck = key[cand_rows]
        if ck.numel() > self.r:
            ck, i = ck.topk(self.r)
            cand_rows = cand_rows[i]
        _, slot, col = assign(self.keys, ck[None, :])
        if slot.numel() == 0:
            return
        rows = cand_rows[col]
        self.keys[0, slot] = ck[col]
        b, t = rows // batch.T, rows % batch.T
        self.doc[slot] = batch.doc[b]
        self.pos[slot] = batch.start[b] + t
        tw = t[:, None] + self.offsets
        inside = (tw >= 0) & (tw < batch.length[b][:, None])
        self.tok[slot] = torch.where(inside, batch.ids[b[:, None], tw.clamp(0, batch.T - 1)],
                                     -1).to(torch.int32)
        self._record(slot, b, t, batch, rows_nz, cols_nz)

    def _record(self, slot: torch.Tensor, b: torch.Tensor, t: torch.Tensor, batch: Batch,
                rows_nz: torch.Tensor, cols_nz: torch.Tensor) -> None:
        """The features firing in each new context: the firings whose flat row lies in its
        window (rows_nz is sorted, so each window is one contiguous run of it), each feature
        once per context; the pairs of the contexts replaced go."""
        lo = b * batch.T + (t - self.before).clamp(min=0)
        hi = b * batch.T + torch.minimum(t + len(self.offsets) - self.before, batch.length[b])
        start = torch.searchsorted(rows_nz, lo)
        n = torch.searchsorted(rows_nz, hi) - start
        which = torch.repeat_interleave(torch.arange(len(slot), device=slot.device), n)
        idx = start[which] + torch.arange(len(which), device=slot.device) - (n.cumsum(0) - n)[which]
        gone = torch.zeros(self.r, dtype=torch.bool, device=slot.device)
        gone[slot] = True
        stay = ~gone[self.pair_slot]
        # A feature firing twice in a window gives two equal pairs: they are removed only when
        # the pairs have doubled since the last time (amortised), and at the end.
        self.pair_slot = torch.cat([self.pair_slot[stay], slot[which]])
        self.pair_feat = torch.cat([self.pair_feat[stay], cols_nz[idx]])
        if len(self.pair_slot) > 2 * max(self._distinct, 4096):
            self._dedupe()

    def _dedupe(self) -> None:
        width = int(self.pair_feat.max()) + 1 if self.pair_feat.numel() else 1
        pairs = torch.unique(self.pair_slot * width + self.pair_feat)
        self.pair_slot, self.pair_feat = pairs // width, pairs % width
        self._distinct = len(pairs)

    def contexts(self) -> Contexts:
        self._dedupe()
        idx = self.keys[0].argsort(descending=True, stable=True)
        rank = torch.empty_like(idx)
        rank[idx] = torch.arange(self.r, device=idx.device)
        ctx = rank[self.pair_slot]
        o = torch.argsort(ctx * (int(self.pair_feat.max()) + 1 if self.pair_feat.numel() else 1)
                          + self.pair_feat)
        counts = torch.bincount(ctx, minlength=self.r)
        ptr = torch.cat([torch.zeros(1, dtype=torch.long, device=idx.device), counts.cumsum(0)])
        return Contexts(self.tok[idx].long().cpu(), self.doc[idx].cpu(), self.pos[idx].cpu(),
                        key_order(self.keys[0, idx]).cpu(), ptr.cpu(), self.pair_feat[o].cpu(),
                        self.before)
