"""One SAE's optimisation state: parameters, Adam, LR schedule, K schedule, statistics."""

from __future__ import annotations

import math
from typing import Any

import torch

import llamascope_sdk.training.checkpoint as ck
from llamascope_sdk.base.dist import Dist
from llamascope_sdk.base.dtypes import parse_dtype
from llamascope_sdk.training.config import TrainConfig
from llamascope_sdk.training.errors import NonFiniteError
from llamascope_sdk.training.trainable import TopKSAE, batch_norm_mse, k_schedule, lr_lambda

_PARAMS = ["W_e", "b_e", "W_d", "b_d"]


class SAEOptimizer:
    """One Top-K SAE with its Adam state, schedules and statistics; trains on (input, target)
    activation batches.

    ``step`` takes this rank's rows; gradients are all-reduced (summed: the loss is already
    divided by the global element count) so every rank holds identical parameters.
    """

    def __init__(self, cfg: TrainConfig, dist: Dist) -> None:
        self.cfg, self.dist = cfg, dist
        self.sae = TopKSAE(cfg.d_model, cfg.d_sae, sparse=cfg.sparse_kernels,
                           dtype=parse_dtype(cfg.dtype), device=cfg.device)
        self.sae.initialize(cfg, torch.Generator().manual_seed(cfg.seed))
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.norm_in = self.norm_out = 0.0
        self.step_count = 0
        self.tokens_seen = 0
        self.last_fired = torch.zeros(cfg.d_sae, dtype=torch.float64)  # token count at last fire
        self.acc: dict[str, float] = {}

    # --------------------------------------------------------------------- normalisation
    def set_norms(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Dataset-wise norms: mean L2 norm over the first ``norm_tokens`` tokens, computed in
        bf16 like the release (values are bf16-quantised there), averaged over ranks."""
        stats = torch.stack([x.to(torch.bfloat16).float().norm(dim=-1).mean(),
                             y.to(torch.bfloat16).float().norm(dim=-1).mean()])
        stats = self.dist.mean(stats)
        self.norm_in, self.norm_out = (float(v) for v in stats.to(torch.bfloat16).float())

    @property
    def s_in(self) -> float:
        return math.sqrt(self.cfg.d_model) / self.norm_in

    @property
    def s_out(self) -> float:
        return math.sqrt(self.cfg.d_model) / self.norm_out

    # --------------------------------------------------------------------- step
    def step(self, x: torch.Tensor, y: torch.Tensor, n_global: int) -> None:
        """One optimiser step on this rank's rows x, y [b, D] of a global batch of n_global."""
        cfg = self.cfg
        dev = self.sae.W_e.device
        x_n = x.to(dev, torch.float32) * self.s_in
        y_n = y.to(dev, torch.float32) * self.s_out
        k = k_schedule(cfg, self.step_count)
        batch_mean = self.dist.sum(y_n.sum(0)) / n_global
        out = self.sae(x_n, k)
        loss = batch_norm_mse(out.y_hat, y_n, batch_mean, n_global)
        total = self.dist.sum(loss.detach().reshape(1))  # every rank sees the same verdict
        if not bool(torch.isfinite(total).all()):
            raise NonFiniteError(
                f"{cfg.name}: the loss is {float(total[0])} at step {self.step_count + 1}; the run "
                "stops before writing a checkpoint, so the last good one is kept",
                hint="lower lr (or set clip_grad_norm); check the activations for NaN/inf")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.sae.parameters():
            if p.grad is not None:
                p.grad = self.dist.sum(p.grad)
        if cfg.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), cfg.clip_grad_norm)
        self.opt.step()
        self.sched.step()
        self.step_count += 1
        self._track(out, y_n, batch_mean, loss, k, n_global)

    @torch.no_grad()
    def _track(self, out: Any, y_n: torch.Tensor, batch_mean: torch.Tensor,
               loss: torch.Tensor, k: int, n_global: int) -> None:
        err = (out.y_hat.float() - y_n).pow(2).sum()
        var = (y_n - batch_mean).pow(2).sum()
        fired = out.values > 0
        a = self.acc
        for key, v in (("loss", float(loss) * n_global), ("err", float(err)), ("var", float(var)),
                       ("l0", float(fired.sum())), ("n", float(y_n.shape[0])),
                       ("elems", float(y_n.numel())), ("k", float(k) * y_n.shape[0])):
            a[key] = a.get(key, 0.0) + v
        self.tokens_seen += n_global
        idx = out.indices[fired].unique().cpu()
        self.last_fired[idx] = float(self.tokens_seen)

    def metrics(self) -> dict[str, float]:
        """Averages since the last call (summed over ranks), then reset."""
        keys = ["loss", "err", "var", "l0", "n", "elems", "k"]
        vals = self.dist.sum(torch.tensor([self.acc.get(k, 0.0) for k in keys], dtype=torch.float64))
        a = dict(zip(keys, vals.tolist(), strict=True))
        self.acc = {}
        n = max(a["n"], 1.0)
        silent = self.tokens_seen - self.last_fired
        window = min(self.cfg.dead_window_tokens, max(self.tokens_seen, 1))
        return {"loss": a["loss"] / max(a["elems"], 1.0), "mse": a["err"] / max(a["elems"], 1.0),
                "ev": 1.0 - a["err"] / max(a["var"], 1e-12), "l0": a["l0"] / n, "k": a["k"] / n,
                "dead": float((silent >= window).double().mean()),
                "lr": self.sched.get_last_lr()[0]}

    # --------------------------------------------------------------------- checkpoint state
    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` if a parameter or an Adam moment is NaN/inf."""
        tensors: dict[str, torch.Tensor] = {}
        for n in _PARAMS:
            p = getattr(self.sae, n)
            tensors[n] = p
            tensors.update({f"{n}.{k}": v for k, v in self.opt.state.get(p, {}).items()
                            if k != "step"})
        bad = [n for n, v in tensors.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteError(
                f"{self.cfg.name}: {', '.join(bad)} hold NaN/inf after {self.step_count} steps; "
                "nothing was written, the last good checkpoint is kept",
                hint="lower lr (or set clip_grad_norm) and resume from the last checkpoint")

    def state(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                      dict[str, torch.Tensor], dict[str, Any]]:
        p = f"{i}."
        model = {p + n: getattr(self.sae, n) for n in _PARAMS}
        optim, opt_scalars = ck.optimizer_to_tensors(self.opt, p, _PARAMS)
        stats = {p + "last_fired": self.last_fired}
        sched = {k: v for k, v in self.sched.state_dict().items() if k != "lr_lambdas"}
        return model, optim, stats, {
            "name": self.cfg.name, "step": self.step_count, "tokens_seen": self.tokens_seen,
            "norm_in": self.norm_in, "norm_out": self.norm_out, "optim": opt_scalars,
            "scheduler": sched}

    def load(self, i: int, model: dict[str, torch.Tensor], optim: dict[str, torch.Tensor],
             stats: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        p = f"{i}."
        with torch.no_grad():
            for n in _PARAMS:
                getattr(self.sae, n).copy_(model[p + n])
        ck.optimizer_from_tensors(self.opt, optim, scalars["optim"], p, _PARAMS)
        sched = self.sched.state_dict()
        sched.update(scalars["scheduler"])
        self.sched.load_state_dict(sched)
        self.last_fired = stats[p + "last_fired"].clone()
        self.step_count, self.tokens_seen = int(scalars["step"]), int(scalars["tokens_seen"])
        self.norm_in, self.norm_out = float(scalars["norm_in"]), float(scalars["norm_out"])
