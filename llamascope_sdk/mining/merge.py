"""Merging the mining states of several ranks (``torchrun``) with torch.distributed.

Sums, firing counts and histograms are added (``all_reduce``); top examples, samples and the
pool of random contexts are gathered (``all_gather``) and each keeps its K largest keys, which
is exactly what one process that saw every batch keeps (see :mod:`llamascope_sdk.mining.state`).
Slots are gathered in blocks of features so that the extra memory is bounded by
:data:`BLOCK_BYTES` x world size, not by the whole state. Every rank ends with the merged state.
gloo on CPU, nccl on CUDA (the process group of :func:`llamascope_sdk.base.dist.init_from_env`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llamascope_sdk.base.dist import Dist
from llamascope_sdk.mining.state import Tracker

#: Bytes of one rank's slots gathered at a time.
BLOCK_BYTES = 64 * 2**20


def all_gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """:meth:`Dist.gather` for a run of ``world`` ranks (the merges need no rank)."""
    return Dist(world=world).gather(t)


def _merge_block(obj: object, names: tuple[str, ...], lo: int, hi: int, world: int) -> None:
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for name in names:
        for r, g in enumerate(all_gather(getattr(obj, name)[lo:hi], world)):
            parts[r][name] = g
    merged = merge_slots(parts)
    for name in names:
        getattr(obj, name)[lo:hi] = merged[name]


def merge_slots(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Slots of several states (``keys``/``doc``/``pos`` [F, K], ``tok``/``act`` [F, K, W])
    merged into the K largest keys per feature: what one pass over all their batches keeps."""
    k = parts[0]["keys"].shape[1]
    top, idx = torch.cat([p["keys"] for p in parts], dim=1).topk(k, dim=1)
    out = {"keys": top}
    for name in ("doc", "pos", "tok", "act"):
        cat = torch.cat([p[name] for p in parts], dim=1)
        out[name] = cat.gather(1, idx if cat.dim() == 2 else idx[..., None].expand(-1, -1, cat.shape[2]))
    return out


def merge_pool(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pools of several states merged into the R largest keys (as :func:`merge_slots`)."""
    r = parts[0]["keys"].shape[1]
    top, idx = torch.cat([p["keys"] for p in parts], dim=1).topk(r, dim=1)
    i = idx[0]
    out = {"keys": top, "fires": torch.cat([p["fires"] for p in parts], dim=1)[:, i]}
    for name in ("doc", "pos", "tok"):
        out[name] = torch.cat([p[name] for p in parts], dim=0)[i]
    return out


def merge_trackers(trackers: Mapping[str, Tracker], dist: Dist) -> None:
    """Replace every rank's trackers by the merge of all ranks' (in place)."""
    world = dist.world
    for tr in trackers.values():
        tr.total.copy_(dist.sum(tr.total))
        tr.fired.copy_(dist.sum(tr.fired))
        tr.hist.copy_(dist.sum(tr.hist))
        for slots in (tr.top, tr.samples):
            if slots is None:
                continue
            names = ("keys", "doc", "pos", "tok", "act")
            per = sum(getattr(slots, n)[0].numel() * getattr(slots, n).element_size() for n in names)
            step = max(1, BLOCK_BYTES // max(1, per))
            for lo in range(0, tr.d_sae, step):
                _merge_block(slots, names, lo, min(lo + step, tr.d_sae), world)
            slots.floor = slots.keys.amin(1)
        pool = tr.pool
        if pool is not None:
            small = {n: all_gather(getattr(pool, n), world) for n in ("keys", "doc", "pos", "tok")}
            parts = [{n: small[n][r] for n in small} | {"fires": pool.fires[:0]} for r in range(world)]
            merged = merge_pool(parts)
            idx = torch.cat(small["keys"], dim=1).topk(pool.r, dim=1).indices[0]
            step = max(1, BLOCK_BYTES // max(1, pool.r))
            fires = torch.empty_like(pool.fires)
            for lo in range(0, tr.d_sae, step):
                hi = min(lo + step, tr.d_sae)
                fires[lo:hi] = torch.cat(all_gather(pool.fires[lo:hi], world), dim=1)[:, idx]
            for n in ("keys", "doc", "pos", "tok"):
                getattr(pool, n).copy_(merged[n])
            pool.fires = fires


__all__ = ["merge_trackers", "merge_slots", "merge_pool", "all_gather", "BLOCK_BYTES"]
