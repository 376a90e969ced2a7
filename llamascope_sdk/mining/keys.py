"""The 64-bit keys that decide what mining keeps, and their fixed pseudo-random priorities.

Every kept entry has a unique key, and a slot keeps the K largest keys seen:

* top-N: ``(float32 bits of f) << 32 | (2^32-1 - order)``, ``order`` being the token's ordinal
  in the corpus (documents in order, then positions), so on an exact tie in activation the
  EARLIER token wins;
* sample: ``priority(order, feature) << 32 | (2^32-1 - order)`` with a fixed integer hash
  (:func:`sample_priority`): reservoir sampling by random priorities, reproducible;
* pool: ``priority(order, -1) << 32 | (2^32-1 - order)`` over every counted token.

Because the kept set is the K largest keys, it does not depend on the order batches are seen
in or on how they are split between processes.
"""

from __future__ import annotations

import torch

INV = 0xFFFFFFFF

__all__ = ["INV", "key_order", "mix", "sample_priority"]


def mix(order: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """A fixed 31-bit hash of (token order, feature), broadcast."""
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
    return mix(order.long()[None, :], features.long()[:, None])


def key_order(keys: torch.Tensor) -> torch.Tensor:
    """The token order stored in the low 32 bits of keys (-1 for empty slots)."""
    return torch.where(keys >= 0, INV - (keys & INV), -1)
