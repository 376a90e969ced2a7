"""One batch as mining's trackers see it: its tokens and where they come from
(:class:`Batch`), and its firings sorted for reading a feature's activations over a window
(:class:`Firings`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Batch", "Firings"]


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
    # [B] index of the row among its document's sequences, and whether it is the last one
    # read; None: every document of the batch is whole in it (the rows are settled at once)
    part: torch.Tensor | None = None
    last: torch.Tensor | None = None


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
