"""Where an activation value stands among a feature's mined activations: its percentile.

The feature store keeps, per feature, a histogram of every activation at which the feature
fired while mining (value > 0, special tokens excluded) over fixed log-spaced bins
(``histogram_edges`` of the manifest: 1e-3 to 1e4, 8 bins per decade). The percentile of a
value ``v`` is the share (in %) of those firings that were below ``v``: the firings of the bins
wholly below ``v``, plus the part of ``v``'s bin below it, taken linearly in log(value) inside
the bin (the histogram does not say where in a bin the firings lie; the two open bins, below
1e-3 and above 1e4, count half). So it is exact to within the share of firings in ``v``'s bin.
A value of 0 (the feature does not fire there) has percentile 0; a feature that never fired
while mining has none (NaN).
"""

from __future__ import annotations

import torch


def percentiles(counts_FB: torch.Tensor, edges: torch.Tensor, features: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
    """Percentiles (0..100, fp32) of ``values`` [..., n] of ``features`` (same shape, or [n]).

    Args:
        counts_FB: firings per feature and bin, [F, len(edges) + 1] (bin b holds values in
            ``(edges[b-1], edges[b]]``, bin 0 everything up to ``edges[0]``).
        edges: the ascending bin edges, positive.
        features: feature indices of ``values``.
        values: activations in model units.
    """
    v = values.detach().float().cpu()
    f = features.detach().long().cpu().expand(v.shape)
    counts = counts_FB.detach().double().cpu()[f]  # [..., B]
    total = counts.sum(-1)
    e = edges.detach().double().cpu()
    b = torch.bucketize(v.double(), e)  # the bin holding each value
    below = torch.cumsum(counts, dim=-1) - counts  # firings in the bins before each bin
    below_b = below.gather(-1, b[..., None])[..., 0]
    in_b = counts.gather(-1, b[..., None])[..., 0]
    inner = (b > 0) & (b < e.numel())
    lo = e[(b - 1).clamp(min=0, max=e.numel() - 1)]
    hi = e[b.clamp(max=e.numel() - 1)]
    frac = torch.where(inner, (v.double().clamp(min=1e-30).log() - lo.log()) / (hi.log() - lo.log()),
                       torch.full_like(lo, 0.5))
    p = 100 * (below_b + frac.clamp(0, 1) * in_b) / total
    p = torch.where(v > 0, p, torch.zeros_like(p))
    return torch.where(total > 0, p, torch.full_like(p, float("nan"))).float()


__all__ = ["percentiles"]
