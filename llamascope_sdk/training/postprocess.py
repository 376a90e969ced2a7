"""Top-K -> JumpReLU post-processing (spec 3.3): one global threshold θ in the folded space.

θ is chosen on one batch of ``threshold_tokens`` tokens so that the mean L0 of
``a * 1[a > θ]`` (a = folded pre-activations, exactly what :class:`llamascope_sdk.SAE`
computes) equals K on that batch: θ is the (N·K + 1)-th largest value of ReLU(a), so exactly
N·K values are strictly above it (barring ties). The authors took the (N·K)-th value, which
gives N·K - 1; the difference is 1/N in the mean L0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llamascope_sdk.loading.sae import SAE

_CHUNK_ELEMS = 64 * 2**20


@torch.no_grad()
def jumprelu_threshold(sae: SAE, x: torch.Tensor, k: int) -> float:
    """The global threshold for ``sae`` (any act_fn; its folded pre-activations are used) on
    raw inputs x [N, D], such that exactly N*k activations exceed it."""
    n = x.shape[0]
    m = n * k + 1
    rows = max(1, _CHUNK_ELEMS // sae.d_sae)
    best = torch.empty(0)
    for s in range(0, n, rows):
        a = F.relu(sae.pre_acts(x[s:s + rows]).float()).flatten()
        cand = torch.cat([best, a.topk(min(m, a.numel())).values.cpu()])
        best = cand.topk(min(m, cand.numel())).values
    if best.numel() < m:
        raise ValueError(f"threshold batch too small: {n} tokens x {sae.d_sae} features")
    return float(best[-1])


def mean_l0(sae: SAE, x: torch.Tensor, threshold: float) -> float:
    a = sae.pre_acts(x)
    return float((a > threshold).float().sum(-1).mean())


def fold(hp: dict[str, Any], raw: dict[str, torch.Tensor]) -> SAE:
    """The SDK's inference model of raw training-space tensors (fp32 fold)."""
    return SAE.from_raw(hp, raw, dtype=torch.float32)
