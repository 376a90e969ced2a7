"""The shuffle buffer of spec 4 / App. A.1: fill to ``capacity`` tokens, shuffle, serve batches,
refill (and reshuffle) when half has been consumed.

All hook points of a chunk stay row-aligned (a transcoder's input and target are the same
token). The state (unconsumed rows + generator + source position) is saved with checkpoints so a
resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class ShuffleBuffer:
    """Batches of activations from a chunk source.

    Args:
        source: iterable of chunks (dict name -> [n, D]) with ``state_dict``/``load_state_dict``.
        keys: the hook points to keep.
        capacity: buffer size in tokens; 0 disables shuffling (chunks are served in order).
        seed: seed of the shuffling generator.
    """

    def __init__(self, source: Any, keys: list[str], capacity: int, seed: int) -> None:
        self.source, self.keys, self.capacity = source, list(keys), capacity
        self.gen = torch.Generator().manual_seed(seed)
        self.data: dict[str, torch.Tensor] = {}
        self._it: Iterator[dict[str, torch.Tensor]] | None = None
        self.exhausted = False

    @property
    def size(self) -> int:
        return 0 if not self.data else int(next(iter(self.data.values())).shape[0])

    def _refill(self, need: int) -> None:
        if self._it is None:
            self._it = iter(self.source)
        parts = [self.data] if self.data else []
        n = self.size
        target = max(self.capacity, need)
        while n < target and not self.exhausted:
            try:
                chunk = next(self._it)
            except StopIteration:
                self.exhausted = True
                break
            parts.append({k: chunk[k] for k in self.keys})
            n += int(chunk[self.keys[0]].shape[0])
        if not parts:
            return
        data = {k: torch.cat([p[k] for p in parts]) for k in self.keys}
        if self.capacity > 0:
            perm = torch.randperm(n, generator=self.gen)
            data = {k: v[perm] for k, v in data.items()}
        self.data = data

    def peek(self, n: int) -> dict[str, torch.Tensor]:
        """The first ``n`` buffered rows without consuming them (for the dataset norm)."""
        if self.size < n:
            self._refill(n)
        return {k: v[:n] for k, v in self.data.items()}

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor] | None:
        """One batch of ``batch_size`` rows, or None when the source is exhausted."""
        if self.size < max(batch_size, self.capacity // 2):
            self._refill(batch_size)
        if self.size < batch_size:
            return None
        out = {k: v[:batch_size] for k, v in self.data.items()}
        self.data = {k: v[batch_size:] for k, v in self.data.items()}
        return out

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, json-able state): unconsumed rows, RNG state, source position."""
        tensors = {f"buffer.{k}": v.contiguous() for k, v in self.data.items()}
        tensors["buffer_rng"] = self.gen.get_state()
        return tensors, {"source": self.source.state_dict(), "exhausted": self.exhausted}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.data = {k: tensors[f"buffer.{k}"] for k in self.keys if f"buffer.{k}" in tensors}
        self.gen.set_state(tensors["buffer_rng"])
        self.source.load_state_dict(state["source"])
        self.exhausted = bool(state["exhausted"])
        self._it = None
