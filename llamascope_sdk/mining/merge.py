"""Merging the mining states of several ranks (``torchrun``) with torch.distributed.

Sums, firing counts and histograms are added (``all_reduce``); the kept examples, samples and
the pool of random contexts are gathered (``all_gather`` of each rank's ragged entries) and
each feature keeps its K largest keys, which is exactly what one process that saw every batch
keeps (see :mod:`llamascope_sdk.mining.state`). A document whose sequences lie on several ranks
is still open on each of them (:mod:`~llamascope_sdk.mining.open_docs`): every sort pool of
batches during the pass, and once more before the merge, the ranks' open rows are gathered
and each document they make whole is settled on rank ``doc % world`` (:func:`share_open`), so
every rank's examples come from whole documents and the spacing rule holds across ranks. Examples are gathered in blocks of
features so that the extra memory is bounded by :data:`BLOCK_BYTES` x world size, not by the
whole state. Every rank ends with the merged state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llamascope_sdk.base.dist import Dist
from llamascope_sdk.mining.contexts import Pool
from llamascope_sdk.mining.slots import Slots, rank_by_feature
from llamascope_sdk.mining.state import Tracker

#: Bytes of one rank's examples gathered at a time.
BLOCK_BYTES = 64 * 2**20


def all_gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """:meth:`Dist.gather` for a run of ``world`` ranks (the merges need no rank)."""
    return Dist(world=world).gather(t)


def all_gather_ragged(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's ``t``, whose first dimension may differ between ranks."""
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [int(s) for s in all_gather(n, world)]
    pad = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    pad[:t.shape[0]] = t
    return [g[:s] for g, s in zip(all_gather(pad, world), sizes, strict=True)]


def merge_slots(parts: list[dict[str, torch.Tensor]], k: int) -> dict[str, torch.Tensor]:
    """Entries of several states (as :meth:`Slots.tensors`) merged into the K largest keys
    per feature: what one pass over all their batches keeps."""
    cat = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    o, rank = rank_by_feature(cat["feat"], cat["keys"])
    keep = o[rank < k]
    return {name: t[keep] for name, t in cat.items()}


def _merge_examples(slots: Slots, world: int) -> None:
    mine = slots.tensors()
    order = mine["feat"].argsort(stable=True)
    mine = {n: t[order] for n, t in mine.items()}
    per_feature = slots.k * (32 + 8 * slots.w)
    step = max(1, BLOCK_BYTES // per_feature)
    merged: list[dict[str, torch.Tensor]] = []
    for lo in range(0, slots.f, step):
        a, b = torch.searchsorted(mine["feat"], torch.tensor([lo, lo + step], device=mine["feat"].device)).tolist()
        parts: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
        for name, t in mine.items():
            for r, g in enumerate(all_gather_ragged(t[a:b], world)):
                parts[r][name] = g
        merged.append(merge_slots(parts, slots.k))
    slots.load({n: torch.cat([m[n] for m in merged]) for n in mine})


def merge_pool(parts: list[dict[str, torch.Tensor]], r: int) -> dict[str, torch.Tensor]:
    """Pools of several states (as :meth:`Pool.tensors`) merged into the R largest keys."""
    keys = torch.cat([p["keys"] for p in parts], dim=1)
    top, idx = keys.topk(r, dim=1)
    i = idx[0]
    out = {"keys": top}
    for name in ("doc", "pos", "tok"):
        out[name] = torch.cat([p[name] for p in parts], dim=0)[i]
    new_slot = torch.full((keys.shape[1],), -1, dtype=torch.long, device=keys.device)
    new_slot[i] = torch.arange(r, device=keys.device)
    glob = torch.cat([p["pair_slot"] + j * r for j, p in enumerate(parts)])
    feat = torch.cat([p["pair_feat"] for p in parts])
    slot = new_slot[glob]
    out["pair_slot"], out["pair_feat"] = slot[slot >= 0], feat[slot >= 0]
    return out


def _merge_contexts(pool: Pool, world: int) -> None:
    mine = pool.tensors()
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for name, t in mine.items():
        gathered = (all_gather_ragged(t, world) if name.startswith("pair_")
                    else all_gather(t, world))
        for r, g in enumerate(gathered):
            parts[r][name] = g
    pool.load(merge_pool(parts, pool.r))


def share_open(trackers: Mapping[str, Tracker], dist: Dist, final: bool = False) -> None:
    """Every rank's rows of documents still open gathered (a document's sequences may lie on
    several ranks), and the documents they make whole (all of them with ``final``) settled,
    each on rank ``doc % world``, whole (see :meth:`OpenDocs.share`). Mining calls it every
    sort pool of batches, so what a rank holds stays bounded, and once more at the end."""
    for tr in trackers.values():
        parts: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.world)]
        for name, t in tr.open.tensors().items():
            for r, g in enumerate(all_gather_ragged(t, dist.world)):
                parts[r][name] = g
        tr.share(parts, dist.world, dist.rank, final)


def merge_trackers(trackers: Mapping[str, Tracker], dist: Dist) -> None:
    """Replace every rank's trackers by the merge of all ranks' (in place)."""
    world = dist.world
    share_open(trackers, dist, final=True)
    for tr in trackers.values():
        tr.total.copy_(dist.sum(tr.total))
        tr.fired.copy_(dist.sum(tr.fired))
        tr.hist.copy_(dist.sum(tr.hist))
        for slots in (tr.top, tr.samples):
            if slots is not None:
                _merge_examples(slots, world)
        if tr.pool is not None:
            _merge_contexts(tr.pool, world)


__all__ = ["merge_trackers", "share_open", "merge_slots", "merge_pool", "all_gather", "all_gather_ragged",
           "BLOCK_BYTES"]
