"""The running state of feature mining, and how one batch of activations updates it.

Per SAE (:class:`Tracker`): three running [F] sums (activation, firings) and a token count;
an activation histogram [F, B] over fixed log-spaced bins (:data:`HIST_EDGES`); the top-N
contexts of every feature; a uniform random sample of each feature's firings (the decile
examples: sorted by activation at the end and cut into deciles); and a pool of random contexts
with, per feature, whether it fired anywhere in each of them (the non-activating examples).

Every entry has a unique 64-bit key and a slot keeps the K largest keys seen:

* top-N: ``(float32 bits of f) << 32 | (2^32-1 - order)``, ``order`` being the token's ordinal
  in the corpus (documents in order, then positions), so on an exact tie in activation the
  EARLIER token wins;
* sample: ``priority(order, feature) << 32 | (2^32-1 - order)`` with a fixed integer hash
  (:func:`sample_priority`): reservoir sampling by random priorities, reproducible;
* pool: ``priority(order, -1) << 32 | (2^32-1 - order)`` over every counted token.

Because the kept set is the K largest keys, it does not depend on the order batches are seen
in or on how they are split between processes: merging two states (:func:`~llamascope_sdk.mining.merge.merge_slots`) gives
exactly the state of one pass over both. Slots are kept unsorted; :meth:`Slots.examples` sorts
them once at the end.

The work per batch is proportional to the batch's firings (non-zero activations, about
tokens x L0), not to tokens x features: mining lists the firings straight from the
pre-activations (:func:`llamascope_sdk.mining.mine.firings`: one comparison and a ``nonzero``, the
dense activations are never built), the histogram and counts are ``bincount`` over them, and
only firings whose key beats the current K-th key of their feature (the slot's floor) are
candidates; only winning entries copy their context window, the activations of the window
read from the firings sorted by (feature, row) (:class:`Firings`), not from a dense tensor.
At the end (:meth:`Slots.examples`) the empty slots, never written while mining, are filled
once and only the filled slots move: touching the state's memory the first time is then
the fixed cost of a run (about 1-2 s per GiB on the 2-core test machine), paid once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Histogram bin edges (model units): 8 bins per decade from 1e-3 to 1e4. Bin 0 counts
#: 0 < f <= 1e-3, bin i counts edges[i-1] < f <= edges[i], the last bin f > 1e4.
HIST_EDGES = torch.logspace(-3, 4, 57, dtype=torch.float64).float()
N_BINS = len(HIST_EDGES) + 1
_INV = 0xFFFFFFFF
#: The "feature" whose priorities draw the pool of random contexts.
POOL_SALT = -1


def _mix(order: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    x = order.long() * 0x5851F42D4C957F2D + feature.long() * 0x14057B7EF767814F
    x = x ^ (x >> 29)
    x = x * 0x2545F4914F6CDD1D
    x = x ^ (x >> 32)
    return (x >> 8) & 0x7FFFFFFF


def sample_priority(order: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random 31-bit priority of each (feature, token): [F, T] int64.

    ``order`` [T] are global token ordinals, ``features`` [F] feature indices. The sample of a
    feature is its firings with the highest priorities (ties impossible: the low 32 bits of
    the sample key are the token order).
    """
    return _mix(order.long()[None, :], features.long()[:, None])


def key_order(keys: torch.Tensor) -> torch.Tensor:
    """The token order stored in the low 32 bits of keys (-1 for empty slots)."""
    return torch.where(keys >= 0, _INV - (keys & _INV), -1)


@dataclass
class Examples:
    """Contexts of a set of features, K per feature (empty slots have ``doc == -1``).

    ``values`` [F, K] activation at the centre token; ``doc``/``pos`` [F, K] where it came
    from (document index in the corpus, token position in the document with BOS at 0);
    ``tokens`` [F, K, W] token ids of the window (-1 outside the sequence); ``acts`` [F, K, W]
    the feature's activation on every window token (0 at special tokens). The centre is at
    window index ``center``.
    """

    values: torch.Tensor
    doc: torch.Tensor
    pos: torch.Tensor
    tokens: torch.Tensor
    acts: torch.Tensor
    center: int

    def select(self, features: torch.Tensor) -> Examples:
        return Examples(self.values[features], self.doc[features], self.pos[features],
                        self.tokens[features], self.acts[features], self.center)


@dataclass
class Contexts:
    """The pool of random contexts: ``tokens`` [R, W], ``doc``/``pos``/``order`` [R] of the
    centre token (-1: empty), ``fires`` [F, R] bool: the feature is non-zero somewhere in
    the context. A feature's non-activating examples are the contexts where it is False."""

    tokens: torch.Tensor
    doc: torch.Tensor
    pos: torch.Tensor
    order: torch.Tensor
    fires: torch.Tensor
    center: int


@dataclass
class Batch:
    """One batch as the trackers see it (tensors on the SAE's device)."""

    ids: torch.Tensor  # [B, T]
    keep: torch.Tensor  # [B, T] real non-special tokens
    length: torch.Tensor  # [B]
    doc: torch.Tensor  # [B] document index
    start: torch.Tensor  # [B] position in its document of the row's first token
    order: torch.Tensor  # [B, T] global token ordinal
    T: int


class Firings:
    """A batch's non-zero activations, sorted by (feature, flat row), for reading a
    feature's activations over a window of rows without the dense [B*T, F] tensor."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
                 n_rows: int) -> None:
        self.n_rows = n_rows
        self.key, o = (cols * n_rows + rows).sort()
        self.rows, self.vals = rows[o], vals[o]

    def windows(self, feat: torch.Tensor, row: torch.Tensor, lo_row: torch.Tensor,
                hi_row: torch.Tensor, before: int, w: int) -> torch.Tensor:
        """[n, w]: feature ``feat[i]``'s activation at rows ``row[i] - before + j``; 0 where
        it did not fire and outside ``[lo_row[i], hi_row[i])`` (the row's sequence)."""
        base = feat * self.n_rows
        lo = torch.searchsorted(self.key, base + torch.maximum(row - before, lo_row))
        hi = torch.searchsorted(self.key, base + torch.minimum(row - before + w, hi_row))
        cnt = (hi - lo).clamp_(min=0)
        dev = feat.device
        which = torch.repeat_interleave(torch.arange(len(feat), device=dev), cnt)
        j = lo[which] + torch.arange(len(which), device=dev) - (cnt.cumsum(0) - cnt)[which]
        out = torch.zeros((len(feat), w), dtype=torch.float32, device=dev)
        out[which, self.rows[j] - row[which] + before] = self.vals[j]
        return out


def _assign(old: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


class Slots:
    """The K largest keys per feature, with where they came from and their context windows."""

    def __init__(self, f: int, k: int, before: int, after: int, device: torch.device) -> None:
        self.k, self.before = k, before
        w = before + 1 + after
        self.offsets = torch.arange(-before, after + 1, device=device)
        self.keys = torch.full((f, k), -1, dtype=torch.long, device=device)
        self.doc = torch.full((f, k), -1, dtype=torch.long, device=device)
        self.pos = torch.full((f, k), -1, dtype=torch.long, device=device)
        # Windows are written only when an entry enters; empty slots (key -1) are never read
        # before examples() masks them, so the memory is not initialised (nor touched).
        self.tok = torch.empty((f, k, w), dtype=torch.int32, device=device)
        self.act = torch.empty((f, k, w), dtype=torch.float32, device=device)
        self.floor = torch.full((f,), -1, dtype=torch.long, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "doc": self.doc, "pos": self.pos, "tok": self.tok, "act": self.act}

    def load(self, t: dict[str, torch.Tensor]) -> None:
        for name, v in t.items():
            getattr(self, name).copy_(v)
        self.floor = self.keys.amin(1)

    def offer(self, feat: torch.Tensor, key: torch.Tensor, row: torch.Tensor, batch: Batch,
              firings: Firings) -> None:
        """Candidates: feature ``feat`` [n], its ``key`` [n] at flat batch row ``row`` [n]
        (``b * T + t``); ``firings`` the batch's non-zero activations."""
        m = key > self.floor[feat]
        feat, key, row = feat[m], key[m], row[m]
        if feat.numel() == 0:
            return
        k = self.k
        # The K best candidates of each feature: sort by key, then (stably) by feature.
        o = torch.argsort(key, descending=True)
        o = o[torch.argsort(feat[o], stable=True)]
        feat, key, row = feat[o], key[o], row[o]
        uniq, counts = torch.unique_consecutive(feat, return_counts=True)
        group = torch.repeat_interleave(torch.arange(len(uniq), device=feat.device), counts)
        rank = torch.arange(len(feat), device=feat.device) - (counts.cumsum(0) - counts)[group]
        m = rank < k
        lin = group[m] * k + rank[m]
        cand = torch.full((len(uniq), k), -1, dtype=torch.long, device=feat.device)
        crow = torch.zeros_like(cand)
        cand.view(-1)[lin] = key[m]
        crow.view(-1)[lin] = row[m]
        ri, slot, col = _assign(self.keys[uniq], cand)
        f = uniq[ri]
        at = f * k + slot  # flat slot index
        src = ri * k + col
        rows = crow.view(-1)[src]
        self.keys.view(-1)[at] = cand.view(-1)[src]
        b, t = rows // batch.T, rows % batch.T
        self.doc.view(-1)[at] = batch.doc[b]
        self.pos.view(-1)[at] = batch.start[b] + t
        w = len(self.offsets)
        tw = t[:, None] + self.offsets  # [n, W]
        inside = (tw >= 0) & (tw < batch.length[b][:, None])
        src_rows = (b[:, None] * batch.T + tw.clamp(0, batch.T - 1)).view(-1)
        tok = batch.ids.reshape(-1).index_select(0, src_rows).view(-1, w)
        act = firings.windows(f, rows, b * batch.T, b * batch.T + batch.length[b], self.before, w)
        self.tok.view(-1, w).index_copy_(0, at, torch.where(inside, tok, -1).to(torch.int32))
        self.act.view(-1, w).index_copy_(0, at, act)
        self.floor[uniq] = self.keys[uniq].amin(1)

    def examples(self, by_value: bool) -> Examples:
        """Every feature's slots sorted: by key (top-N: activation, then earlier token), or
        with ``by_value`` by activation then corpus order (the sample). Empty slots last.

        Sorts the windows in place, in blocks of features (no second copy of the state): the
        slots are finished afterwards."""
        f, k, w = self.tok.shape
        keys = self.keys
        values = torch.where(keys >= 0, self.act[:, :, self.before], 0.0)
        if by_value:
            keys = torch.where(keys >= 0, (values.contiguous().view(torch.int32).long() << 32)
                               | (keys & _INV), -1)
        idx = keys.argsort(dim=1, descending=True, stable=True)
        empty = keys.gather(1, idx) < 0
        # In place, touching each byte about once: empty slots (never written while mining,
        # so not yet in memory) are filled with -1/0 in one pass; only the filled slots move,
        # listed by their sorted rank (filled slots sort before empty ones).
        tok, act = self.tok.view(f * k, w), self.act.view(f * k, w)
        filled = keys >= 0
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            tok.masked_fill_(~filled.view(-1, 1), -1)
            act.masked_fill_(~filled.view(-1, 1), 0.0)
        finally:
            torch.set_num_threads(threads)
        dst = (~empty).view(-1).nonzero().squeeze(1)
        src = (idx + torch.arange(f, device=idx.device)[:, None] * k).view(-1)[dst]
        moved = dst != src
        dst, src = dst[moved], src[moved]
        tok.index_copy_(0, dst, tok.index_select(0, src))
        act.index_copy_(0, dst, act.index_select(0, src))
        return Examples(values.gather(1, idx).cpu(), self.doc.gather(1, idx).cpu(),
                        self.pos.gather(1, idx).cpu(), self.tok.cpu(), self.act.cpu(), self.before)


class Pool:
    """A uniform random sample of R contexts of the corpus, shared by all features, and for
    each feature whether it fires anywhere in each of them."""

    def __init__(self, f: int, r: int, before: int, after: int, device: torch.device) -> None:
        self.r, self.before = r, before
        self.offsets = torch.arange(-before, after + 1, device=device)
        self.keys = torch.full((1, r), -1, dtype=torch.long, device=device)
        self.doc = torch.full((r,), -1, dtype=torch.long, device=device)
        self.pos = torch.full((r,), -1, dtype=torch.long, device=device)
        self.tok = torch.full((r, before + 1 + after), -1, dtype=torch.int32, device=device)
        self.fires = torch.zeros((f, r), dtype=torch.bool, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "doc": self.doc, "pos": self.pos, "tok": self.tok,
                "fires": self.fires}

    def load(self, t: dict[str, torch.Tensor]) -> None:
        for name, v in t.items():
            getattr(self, name).copy_(v)

    def offer(self, batch: Batch, rows_nz: torch.Tensor, cols_nz: torch.Tensor) -> None:
        """``rows_nz``/``cols_nz``: the batch's firings (flat row ascending, feature)."""
        order = batch.order.reshape(-1)
        pri = _mix(order, torch.tensor(POOL_SALT, device=order.device))
        key = torch.where(batch.keep.reshape(-1), (pri << 32) | (_INV - order), -1)
        floor = self.keys.min()
        cand_rows = (key > floor).nonzero().squeeze(1)
        if cand_rows.numel() == 0:
            return
        ck = key[cand_rows]
        if ck.numel() > self.r:
            ck, i = ck.topk(self.r)
            cand_rows = cand_rows[i]
        _, slot, col = _assign(self.keys, ck[None, :])
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
        # Features firing in each new context: the firings whose flat row lies in its window
        # (rows_nz is sorted, so each window is one contiguous run of it).
        lo = b * batch.T + (t - self.before).clamp(min=0)
        hi = b * batch.T + torch.minimum(t + len(self.offsets) - self.before, batch.length[b])
        start = torch.searchsorted(rows_nz, lo)
        n = torch.searchsorted(rows_nz, hi) - start
        which = torch.repeat_interleave(torch.arange(len(slot), device=slot.device), n)
        idx = start[which] + torch.arange(len(which), device=slot.device) - (n.cumsum(0) - n)[which]
        self.fires[:, slot] = False
        self.fires[cols_nz[idx], slot[which]] = True

    def contexts(self) -> Contexts:
        idx = self.keys[0].argsort(descending=True, stable=True)
        return Contexts(self.tok[idx].long().cpu(), self.doc[idx].cpu(), self.pos[idx].cpu(),
                        key_order(self.keys[0, idx]).cpu(), self.fires[:, idx].cpu(), self.before)


@dataclass
class MiningConfig:
    """What mining keeps per feature (see :func:`~llamascope_sdk.mining.mine.mine`)."""

    top_n: int = 20
    window_before: int = 16
    window_after: int = 4
    n_samples: int = 100
    deciles: int = 10
    example_context: int = 64
    n_nonactivating: int = 100
    nonactivating_pool: int = 1000

    @property
    def example_before(self) -> int:
        """Tokens before the firing token in a decile/non-activating context (3/4 of it)."""
        return (3 * self.example_context) // 4

    @property
    def example_after(self) -> int:
        return self.example_context - 1 - self.example_before

    @property
    def pool(self) -> int:
        return self.nonactivating_pool if self.n_nonactivating > 0 else 0


class Tracker:
    """Everything mined for one SAE."""

    def __init__(self, d_sae: int, cfg: MiningConfig, device: torch.device) -> None:
        f = d_sae
        self.d_sae, self.cfg = f, cfg
        self.top = Slots(f, cfg.top_n, cfg.window_before, cfg.window_after, device)
        self.samples = (Slots(f, cfg.n_samples, cfg.example_before, cfg.example_after, device)
                        if cfg.n_samples > 0 else None)
        self.pool = (Pool(f, cfg.pool, cfg.example_before, cfg.example_after, device)
                     if cfg.pool > 0 else None)
        self.total = torch.zeros(f, dtype=torch.float64, device=device)
        self.fired = torch.zeros(f, dtype=torch.long, device=device)
        self.hist = torch.zeros(f * N_BINS, dtype=torch.long, device=device)
        self.edges = HIST_EDGES.to(device)

    def update(self, f_BTF: torch.Tensor, batch: Batch) -> None:
        """One batch from its dense activations [B, T, F] (see :meth:`update_sparse`)."""
        flat = f_BTF.reshape(-1, f_BTF.shape[-1])
        rows, cols = (flat > 0).nonzero(as_tuple=True)
        self.update_sparse(rows, cols, flat[rows, cols], batch)

    def update_sparse(self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
                      batch: Batch) -> None:
        """One batch from its firings: flat rows (``b * T + t``, ascending) [n], features [n]
        and activations [n] (> 0); firings on tokens outside ``batch.keep`` are dropped."""
        f = self.d_sae
        m = batch.keep.reshape(-1)[rows]
        rows, cols, vals = rows[m], cols[m], vals[m].float()
        # Sums over the firings in their (row-major) order: the same on every machine and
        # thread count, so a distributed run adds exactly the same per-batch sums.
        self.total += torch.bincount(cols, weights=vals.double(), minlength=f)
        self.fired += torch.bincount(cols, minlength=f)
        self.hist += torch.bincount(cols * N_BINS + torch.bucketize(vals, self.edges),
                                    minlength=self.hist.numel())
        order = batch.order.reshape(-1)[rows]
        inv = _INV - order
        firings = Firings(rows, cols, vals, batch.ids.numel())
        self.top.offer(cols, (vals.view(torch.int32).long() << 32) | inv, rows, batch, firings)
        if self.samples is not None:
            self.samples.offer(cols, (_mix(order, cols) << 32) | inv, rows, batch, firings)
        if self.pool is not None:
            self.pool.offer(batch, rows, cols)

    # ------------------------------------------------------------------ state
    def tensors(self) -> dict[str, torch.Tensor]:
        """The whole state as named tensors (checkpoints and the distributed merge)."""
        out = {"total": self.total, "fired": self.fired, "hist": self.hist}
        out |= {f"top.{k}": v for k, v in self.top.tensors().items()}
        if self.samples is not None:
            out |= {f"samples.{k}": v for k, v in self.samples.tensors().items()}
        if self.pool is not None:
            out |= {f"pool.{k}": v for k, v in self.pool.tensors().items()}
        return out

    def load(self, t: dict[str, torch.Tensor]) -> None:
        for name in ("total", "fired", "hist"):
            getattr(self, name).copy_(t[name])
        for part in ("top", "samples", "pool"):
            obj = getattr(self, part)
            if obj is not None:
                obj.load({k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(part + ".")})


def state_bytes(d_sae: int, top_n: int = 20, window: int = 21, n_samples: int = 100,
                example_context: int = 64, pool: int = 1000) -> int:
    """Bytes of a miner's running state for one SAE (see :mod:`llamascope_sdk.mining.mine`)."""
    slot = 24  # key, doc, pos (int64)
    return (d_sae * (top_n * (slot + window * 8) + n_samples * (slot + example_context * 8)
                     + 8 * N_BINS + 32 + pool)
            + pool * (slot + example_context * 4))


__all__ = ["HIST_EDGES", "Examples", "Contexts", "MiningConfig", "Tracker", "Batch",
           "sample_priority", "state_bytes"]
