"""The training-space Top-K SAE (spec 3.1) with its init, schedules and loss (spec 4).

Training space: inputs are scaled by s_in = sqrt(D)/n_in, targets by s_out = sqrt(D)/n_out::

    h     = W_e x_n + b_e
    S     = top-k_t of ReLU(h_i) * ||d_i||        # decoder-norm-aware ranking
    f_i   = ReLU(h_i) for i in S, else 0          # the kept value is NOT scaled by ||d_i||
    y^_n  = W_d f + b_d

Decoder columns are never renormalised. The decoder is stored feature-major ([F, D] rows, the
transpose of the release's ``decoder.weight``) so the sparse kernels gather contiguous rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llamascope_sdk.training.config import TrainConfig
from llamascope_sdk.training.kernels import bag_sum, select

#: Above this fraction of selected features the dense masked path is faster on CPU.
_SPARSE_MAX_DENSITY = 0.02


class TopKOutput(NamedTuple):
    y_hat: torch.Tensor  # [B, D] prediction of the normalised target
    indices: torch.Tensor  # [B, k] selected features
    values: torch.Tensor  # [B, k] their ReLU activations (may be 0)


class TopKSAE(nn.Module):
    """Trainable Top-K SAE/transcoder in training space.

    Args:
        d_model, d_sae: sizes.
        sparse: use the sparse kernels (k rows touched) instead of a dense masked decoder.
    """

    def __init__(self, d_model: int, d_sae: int, *, sparse: bool = True,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.W_e = nn.Parameter(torch.zeros(d_sae, d_model, dtype=dtype, device=device))  # [F, D]
        self.b_e = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        self.W_d = nn.Parameter(torch.zeros(d_sae, d_model, dtype=dtype, device=device))  # dec.T
        self.b_d = nn.Parameter(torch.zeros(d_model, dtype=dtype, device=device))
        self.sparse = sparse

    @torch.no_grad()
    def initialize(self, cfg: TrainConfig, generator: torch.Generator) -> None:
        """Spec 4 init: Kaiming-uniform decoder with columns at ``init_decoder_norm``; encoder
        = decoder transpose, except transcoders (Kaiming-uniform rows at ``init_encoder_norm``);
        zero biases ("all_zero")."""
        f, d = self.W_d.shape
        bound = math.sqrt(6.0 / f)  # kaiming_uniform(a=0) of decoder.weight [D, F]: fan_in = F
        dec = (torch.rand(d, f, generator=generator) * 2 - 1) * bound
        dec = dec / dec.norm(dim=0, keepdim=True) * cfg.init_decoder_norm
        self.W_d.copy_(dec.t())
        if cfg.is_transcoder:
            b = math.sqrt(6.0 / d)
            enc = (torch.rand(f, d, generator=generator) * 2 - 1) * b
            enc = enc / enc.norm(dim=1, keepdim=True) * float(cfg.init_encoder_norm or 0.5)
            self.W_e.copy_(enc)
        else:
            self.W_e.copy_(dec.t())
        self.b_e.zero_()
        self.b_d.zero_()

    def decoder_norms(self) -> torch.Tensor:
        return self.W_d.detach().float().norm(dim=1)  # ||d_i||, [F]

    def forward(self, x_n: torch.Tensor, k: int) -> TopKOutput:
        """Top-k forward on normalised inputs x_n [B, D]."""
        x_n = x_n.to(self.W_e.dtype)
        if self.sparse and k <= _SPARSE_MAX_DENSITY * self.W_e.shape[0]:
            with torch.no_grad():
                h0 = F.linear(x_n, self.W_e)  # [B, F]: ranking only, no autograd graph
                key = F.relu((h0 + self.b_e).float()) * self.decoder_norms()
                idx = key.topk(k, dim=-1, sorted=False).indices
                h_sel = h0.gather(-1, idx)
            vals = F.relu(select(h_sel, x_n, self.W_e, idx) + self.b_e[idx])
            return TopKOutput(bag_sum(vals, self.W_d, idx) + self.b_d, idx, vals)
        h = F.linear(x_n, self.W_e, self.b_e)
        idx = (F.relu(h.detach().float()) * self.decoder_norms()).topk(k, dim=-1, sorted=False).indices
        vals = F.relu(h.gather(-1, idx))
        f_dense = torch.zeros_like(h).scatter(-1, idx, vals)
        return TopKOutput(f_dense @ self.W_d + self.b_d, idx, vals)

    def raw_tensors(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """The four release tensors (training space, decoder.weight as [D, F])."""
        return {"encoder.weight": self.W_e.detach().to(dtype).contiguous(),
                "encoder.bias": self.b_e.detach().to(dtype).contiguous(),
                "decoder.weight": self.W_d.detach().t().to(dtype).contiguous(),
                "decoder.bias": self.b_d.detach().to(dtype).contiguous()}


def k_schedule(cfg: TrainConfig, step: int) -> int:
    """k_t = ceil(max(1, k0 + (1 - k0) t / T_k) K) with k0 = k_init / K (released ``update_k``)."""
    t_k = cfg.k_warmup_steps
    if t_k <= 0:
        return cfg.top_k
    kappa0 = cfg.k_init / cfg.top_k
    return min(cfg.d_sae, math.ceil(max(1.0, kappa0 + (1 - kappa0) * step / t_k) * cfg.top_k))


def lr_lambda(cfg: TrainConfig):  # noqa: ANN201 - returns a LambdaLR function
    """lambda(t) = min(1, (t+1)/W, r + (1 - r)(T - t)/C): warm-up, flat, linear cool-down."""
    total, warm = cfg.total_steps, cfg.warmup_steps
    cool = max(1.0, cfg.lr_cooldown_fraction * total)
    r = cfg.lr_end_ratio

    def fn(t: int) -> float:
        w = 1.0 if warm <= 0 else (t + 1) / warm
        return max(0.0, min(1.0, w, r + (1 - r) * (total - t) / cool))

    return fn


def batch_norm_mse(y_hat: torch.Tensor, y_n: torch.Tensor, batch_mean: torch.Tensor,
                   n_global: int) -> torch.Tensor:
    """Spec 4 ``use_batch_norm_mse``: sum over (b, d) of (y^ - y)^2 / ||y_b - mean_batch(y)||_2,
    divided by the global number of elements (so data-parallel ranks sum to the mean)."""
    denom = (y_n - batch_mean).norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return ((y_hat.float() - y_n) ** 2 / denom).sum() / (n_global * y_n.shape[-1])
