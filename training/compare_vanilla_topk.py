#!/usr/bin/env python
"""Vanilla (ReLU + L1) vs Top-K SAEs on SmolLM2-135M activations at matched explained variance.

    python training/compare_vanilla_topk.py [--cache runs/demo-cache] [--out runs/compare]

Both use the same data, width, Adam settings, dataset-wise norm and batch-normalised MSE; the
vanilla SAE adds an L1 penalty weighted by decoder norms (sum_i |f_i| ||d_i||, the
``sparsity_include_decoder_norm`` form), the Top-K SAE anneals K as in the recipe. A small sweep
of the L1 coefficient and of K traces L0 against centred EV; the table reports the L0 each
needs at matched EV (log-linear interpolation). Writes ``compare.md`` and ``compare.png``.
Runs in a few minutes on 2 CPU cores (width 2x = 1152 features, 120 steps of 512 tokens).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HOOK = "blocks.15.hook_resid_post"


def load_cache(folder: str, n_train: int, n_eval: int) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    from llamascope_sdk.training.cache import read_manifest

    man = read_manifest(folder)
    xs, n = [], 0
    for s in man["shards"]:
        xs.append(load_file(str(Path(folder) / s["file"]))[HOOK])
        n += xs[-1].shape[0]
        if n >= n_train + n_eval:
            break
    x = torch.cat(xs).float()
    g = torch.Generator().manual_seed(0)
    x = x[torch.randperm(x.shape[0], generator=g)]
    return x[:n_train], x[n_train:n_train + n_eval]


class VanillaSAE(torch.nn.Module):
    def __init__(self, d: int, f: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dec = torch.rand(f, d, generator=g) * 2 - 1
        dec = dec / dec.norm(dim=1, keepdim=True) * 0.5
        self.W_e = torch.nn.Parameter(dec.clone())
        self.b_e = torch.nn.Parameter(torch.zeros(f))
        self.W_d = torch.nn.Parameter(dec.clone())
        self.b_d = torch.nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = F.relu(F.linear(x, self.W_e, self.b_e))
        return f @ self.W_d + self.b_d, f


def train_vanilla(x: torch.Tensor, l1: float, steps: int, bs: int, f_dim: int) -> VanillaSAE:
    from llamascope_sdk.training.trainable import batch_norm_mse

    m = VanillaSAE(x.shape[1], f_dim, 0)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3, betas=(0.9, 0.9999))
    for t in range(steps):
        xb = x[(t * bs) % x.shape[0]:][:bs]
        y_hat, f = m(xb)
        warm = min(1.0, (t + 1) / (0.1 * steps))  # L1 warm-up over 10% (l1_coefficient_warmup)
        l1_term = (f * m.W_d.norm(dim=1)).sum(-1).mean()
        loss = batch_norm_mse(y_hat, xb, xb.mean(0), xb.shape[0]) + warm * l1 * l1_term
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


def train_topk(x: torch.Tensor, k: int, steps: int, bs: int, f_dim: int):  # noqa: ANN201
    from llamascope_sdk.base.dist import Dist
    from llamascope_sdk.training.config import TrainConfig
    from llamascope_sdk.training.optimizer import SAEOptimizer

    cfg = TrainConfig(name=f"topk{k}", hook_point_in=HOOK, hook_point_out=HOOK,
                      d_model=x.shape[1], expansion_factor=f_dim // x.shape[1], top_k=k,
                      total_tokens=steps * bs, batch_size=bs, lr=2e-3, lr_warmup_steps=0.05,
                      clip_grad_norm=None)
    tr = SAEOptimizer(cfg, Dist())
    tr.norm_in = tr.norm_out = math.sqrt(x.shape[1])  # x is pre-normalised below
    for t in range(steps):
        xb = x[(t * bs) % x.shape[0]:][:bs]
        tr.step(xb, xb, xb.shape[0])
    return tr.sae


@torch.no_grad()
def ev_l0(y_hat: torch.Tensor, f: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    ev = 1 - float((x - y_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return ev, float((f > 0).float().sum(-1).mean())


def interp_l0(points: list[tuple[float, float]], ev: float) -> float | None:
    """L0 at ``ev`` on a curve of (ev, l0) points, log-linear between neighbours."""
    pts = sorted(points)
    for (e0, l0), (e1, l1) in zip(pts, pts[1:], strict=False):
        if e0 <= ev <= e1 and e1 > e0:
            w = (ev - e0) / (e1 - e0)
            return math.exp(math.log(max(l0, 1e-3)) * (1 - w) + math.log(max(l1, 1e-3)) * w)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cache", default=str(ROOT / "runs/demo-cache"))
    p.add_argument("--out", default=str(ROOT / "runs/compare"))
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--width", type=int, default=1152)
    p.add_argument("--l1", type=float, nargs="+", default=[0.01, 0.04, 0.16, 0.64])
    p.add_argument("--k", type=int, nargs="+", default=[8, 16, 32])
    args = p.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_tr, x_ev = load_cache(args.cache, args.steps * args.batch // 2, 16_384)
    scale = math.sqrt(x_tr.shape[1]) / float(x_tr[:16_384].norm(dim=-1).mean())
    x_tr, x_ev = x_tr * scale, x_ev * scale  # dataset-wise norm, shared by both methods
    rows = []
    for l1 in args.l1:
        m = train_vanilla(x_tr, l1 * 1e-3, args.steps, args.batch, args.width)
        rows.append(("vanilla ReLU+L1", f"l1={l1:g}e-3", *ev_l0(*m(x_ev), x_ev)))
        print(rows[-1], flush=True)
    for k in args.k:
        sae = train_topk(x_tr, k, args.steps, args.batch, args.width)
        o = sae(x_ev, k)
        f = torch.zeros(x_ev.shape[0], args.width).scatter(-1, o.indices, o.values.detach())
        rows.append(("Top-K", f"K={k}", *ev_l0(o.y_hat.detach(), f, x_ev)))
        print(rows[-1], flush=True)
    van = [(e, l0) for m_, _, e, l0 in rows if m_.startswith("vanilla")]
    lines = ["| method | setting | EV (centred, held-out) | L0 |", "|---|---|---|---|"]
    lines += [f"| {m_} | {s} | {e:.3f} | {l0:.1f} |" for m_, s, e, l0 in rows]
    lines += ["", "| matched EV | Top-K L0 | vanilla L0 needed | ratio |", "|---|---|---|---|"]
    for m_, s, e, l0 in rows:
        if m_ == "Top-K":
            v = interp_l0(van, e)
            lines.append(f"| {e:.3f} ({s}) | {l0:.0f} | {'n/a (outside sweep)' if v is None else f'{v:.0f}'} | "
                         f"{'' if v is None else f'{v / l0:.1f}x'} |")
    text = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(text)
    print(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, mk in (("vanilla ReLU+L1", "o-"), ("Top-K", "s-")):
        pts = sorted((l0, e) for m_, _, e, l0 in rows if m_ == name)
        ax.plot([a for a, _ in pts], [b for _, b in pts], mk, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel("explained variance (centred)")
    ax.set_title("SmolLM2-135M L15R, 1152 features")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=120)
    print(f"wrote {out / 'compare.md'} and {out / 'compare.png'}")


if __name__ == "__main__":
    main()
