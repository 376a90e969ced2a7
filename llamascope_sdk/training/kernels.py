"""Sparse Top-K kernels: forward and backward touch only the k selected features.

Two ops, each the other's backward (peers 5.2 item 3)::

    gather_dot(x [B,D], W [F,D], idx [B,k]) -> v [B,k],  v[b,j] = x[b] . W[idx[b,j]]
    bag_sum(v [B,k], W [F,D], idx [B,k])    -> y [B,D],  y[b]   = sum_j v[b,j] W[idx[b,j]]

``bag_sum`` is the decoder (``embedding_bag`` with per-sample weights); ``gather_dot`` computes
the selected encoder pre-activations with gradients. Weight gradients are accumulated with
``index_add_`` into the k rows used, never a dense [B,F] matrix. Work is chunked over the batch
so the [chunk,k,D] temporaries stay under ~64 MB even while K is annealed from D/2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_CHUNK_ELEMS = 16 * 2**20  # elements of a [chunk, k, D] temporary


def _chunks(b: int, k: int, d: int) -> range:
    step = max(1, _CHUNK_ELEMS // max(1, k * d))
    return range(0, b, step)


def _gather_dot(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    b, k = idx.shape
    out = torch.empty(b, k, device=x.device, dtype=x.dtype)
    step = max(1, _CHUNK_ELEMS // max(1, k * x.shape[1]))
    for s in range(0, b, step):
        rows = w[idx[s:s + step]]  # [c, k, D]
        out[s:s + step] = torch.bmm(rows, x[s:s + step, :, None]).squeeze(-1)
    return out


def _bag_sum(v: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    b, k = idx.shape
    offsets = torch.arange(0, b * k, k, device=idx.device)
    return F.embedding_bag(idx.reshape(-1), w, offsets, mode="sum",
                           per_sample_weights=v.reshape(-1).to(w.dtype))


def _outer_index_add(w_shape: torch.Size, a: torch.Tensor, x: torch.Tensor,
                     idx: torch.Tensor) -> torch.Tensor:
    """grad_W = sum over (b,j) of a[b,j] * x[b] added at row idx[b,j]."""
    grad = torch.zeros(w_shape, device=x.device, dtype=torch.float32)
    b, k = idx.shape
    step = max(1, _CHUNK_ELEMS // max(1, k * x.shape[1]))
    for s in range(0, b, step):
        contrib = a[s:s + step, :, None].float() * x[s:s + step, None, :].float()  # [c,k,D]
        grad.index_add_(0, idx[s:s + step].reshape(-1), contrib.reshape(-1, x.shape[1]))
    return grad


class GatherDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, idx)
        return _gather_dot(x, w, idx)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        x, w, idx = ctx.saved_tensors
        gx = _bag_sum(g, w, idx).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = _outer_index_add(w.shape, g, x, idx).to(w.dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, None


class BagSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v, w, idx)
        return _bag_sum(v, w, idx)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        v, w, idx = ctx.saved_tensors
        gv = _gather_dot(g.to(w.dtype), w, idx).to(v.dtype) if ctx.needs_input_grad[0] else None
        gw = _outer_index_add(w.shape, v, g, idx).to(w.dtype) if ctx.needs_input_grad[1] else None
        return gv, gw, None


def gather_dot(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """v[b,j] = x[b] . w[idx[b,j]]  ([B,D], [F,D], [B,k] -> [B,k]), sparse backward."""
    return GatherDot.apply(x, w, idx)


def bag_sum(v: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y[b] = sum_j v[b,j] w[idx[b,j]]  ([B,k], [F,D], [B,k] -> [B,D]), sparse backward."""
    return BagSum.apply(v, w, idx)
