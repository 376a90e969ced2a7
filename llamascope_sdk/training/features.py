"""Find interpretable, steerable features of a trained SAE from cached activations.

Uses the token ids and document indices stored in an activation cache: for each feature, its
firing frequency, top tokens by total activation, and its selectivity for a document group
(e.g. "Shakespeare" vs "Wikipedia" documents of a two-file corpus).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from llamascope_sdk.sae import SAE


@torch.no_grad()
def feature_counts(sae: SAE, x: torch.Tensor, tokens: torch.Tensor, group: torch.Tensor,
                  chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Per-feature firing counts overall and in ``group`` (bool [N]), and activation sums."""
    f_dim = sae.d_sae
    fires = torch.zeros(f_dim)
    fires_g = torch.zeros(f_dim)
    mass = torch.zeros(f_dim)
    for s in range(0, x.shape[0], chunk):
        f = sae.encode(x[s:s + chunk].float())
        on = (f > 0).float()
        fires += on.sum(0)
        fires_g += on[group[s:s + chunk]].sum(0)
        mass += f.sum(0)
    return {"fires": fires, "fires_group": fires_g, "mass": mass}


@torch.no_grad()
def top_tokens(sae: SAE, x: torch.Tensor, tokens: torch.Tensor, feature: int, tokenizer: Any,
               n: int = 8, chunk: int = 8192) -> list[tuple[str, float]]:
    """Tokens with the largest total activation of ``feature`` (decoded, with their share)."""
    acts = torch.cat([sae.encode_features(x[s:s + chunk].float(), [feature])[:, 0]
                      for s in range(0, x.shape[0], chunk)])
    totals: Counter[int] = Counter()
    for t, a in zip(tokens[acts > 0].tolist(), acts[acts > 0].tolist(), strict=True):
        totals[t] += a
    whole = sum(totals.values()) or 1.0
    return [(tokenizer.decode([t]), v / whole) for t, v in totals.most_common(n)]


def selective_features(stats: dict[str, torch.Tensor], group_fraction: float, n: int = 10,
                       min_freq: float = 1e-3, total: int = 1) -> list[int]:
    """Features that fire often and mostly inside the group (e.g. Shakespeare documents)."""
    freq = stats["fires"] / total
    share = stats["fires_group"] / stats["fires"].clamp_min(1)
    score = torch.where(freq > min_freq, share, torch.zeros_like(share)) * freq.sqrt()
    score[share < max(0.95, group_fraction)] = 0
    return [int(i) for i in score.topk(n).indices if score[i] > 0]
