"""Sparse Top-K kernels: backward passes touch only the k selected features per token.

Two ops (peers 5.2 item 3), with S the sparse [B, F] matrix holding k entries per row::

    select(h_sel, x, W, idx) -> h_sel      # selected encoder pre-activations, W = encoder [F,D]
        backward: dW = S(g)^T x (sparse mm), dx = bag_sum(g, W, idx)
    bag_sum(v [B,k], W [F,D], idx [B,k]) -> y [B,D],  y[b] = sum_j v[b,j] W[idx[b,j]]
        forward: embedding_bag; backward: dv = SDDMM(g, W) at idx, dW = S(v)^T g (sparse mm)

No dense [B, F] matrix is formed after the (necessarily dense) encoder matmul used to rank the
features. Measured on 2 CPU cores at B=2048, F=4608, D=576, k=32: the dense masked decoder
forward+backward costs ~1.3 s, these kernels ~0.4 s; at density above a few percent (K
annealing starts at D/2) dense wins on CPU, so :class:`TopKSAE` switches by density.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F


def _sparse_t(vals: torch.Tensor, idx: torch.Tensor, n_features: int) -> torch.Tensor:
    """S^T as a COO [F, B] tensor with S[b, idx[b,j]] = vals[b,j]."""
    b, k = idx.shape
    cols = torch.arange(b, device=idx.device).repeat_interleave(k)
    return torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), cols]), vals.reshape(-1),
                                   (n_features, b), check_invariants=False)


def sparse_t_matmul(vals: torch.Tensor, idx: torch.Tensor, x: torch.Tensor,
                    n_features: int) -> torch.Tensor:
    """S^T @ x: [F, D] weight gradient accumulated only into the rows that were selected."""
    x = x.float()  # CPU sparse kernels lack bf16; accumulate in fp32
    s = _sparse_t(vals.to(x.dtype), idx, n_features)
    return torch.sparse.mm(s, x)


def gather_dot(g: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[b,j] = g[b] . w[idx[b,j]] by a sampled dense-dense matmul (no [B,k,D] gather)."""
    b, k = idx.shape
    g, w = g.float(), w.float()  # sampled_addmm has no bf16 kernel on CPU
    sidx, order = idx.sort(dim=1)
    crow = torch.arange(0, b * k + 1, k, device=idx.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR is beta"
        s = torch.sparse_csr_tensor(crow, sidx.reshape(-1), torch.zeros(b * k, dtype=g.dtype,
                                    device=g.device), (b, w.shape[0]))
        vals = torch.sparse.sampled_addmm(s, g, w.t(), beta=0.0).values().reshape(b, k)
    return torch.empty_like(vals).scatter_(1, order, vals)


def _bag(v: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    b, k = idx.shape
    offsets = torch.arange(0, b * k, k, device=idx.device)
    return F.embedding_bag(idx.reshape(-1), w, offsets, mode="sum",
                           per_sample_weights=v.reshape(-1).to(w.dtype))


class Select(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h_sel: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, idx)
        return h_sel.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        x, w, idx = ctx.saved_tensors
        gx = _bag(g, w, idx).to(x.dtype) if ctx.needs_input_grad[1] else None
        gw = sparse_t_matmul(g, idx, x, w.shape[0]).to(w.dtype) if ctx.needs_input_grad[2] else None
        return None, gx, gw, None


class BagSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v, w, idx)
        return _bag(v, w, idx)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        v, w, idx = ctx.saved_tensors
        g = g.contiguous()
        gv = gather_dot(g.to(w.dtype), w, idx).to(v.dtype) if ctx.needs_input_grad[0] else None
        gw = sparse_t_matmul(v, idx, g, w.shape[0]).to(w.dtype) if ctx.needs_input_grad[1] else None
        return gv, gw, None


def select(h_sel: torch.Tensor, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Selected pre-activations ``h_sel`` [B,k] (already computed as x . w[idx]) with a sparse
    backward to ``x`` and ``w``."""
    return Select.apply(h_sel, x, w, idx)


def bag_sum(v: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y[b] = sum_j v[b,j] w[idx[b,j]]  ([B,k], [F,D], [B,k] -> [B,D]), sparse backward."""
    return BagSum.apply(v, w, idx)
