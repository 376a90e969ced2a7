"""Sparse kernels against a dense reference; init; K and LR schedules; the loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from llamascope_sdk.training.kernels import bag_sum, select
from llamascope_sdk.training.trainable import TopKSAE, batch_norm_mse, k_schedule, lr_lambda

from .tiny import tiny_config


def test_kernels_match_dense_gradients() -> None:
    torch.manual_seed(0)
    b, f, d, k = 7, 40, 12, 5
    x = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(f, d, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(f)[:k] for _ in range(b)])
    g = torch.randn(b, k, dtype=torch.float64)
    dense = torch.bmm(w[idx], x[:, :, None]).squeeze(-1)  # autograd reference
    ref = torch.autograd.grad((dense * g).sum(), (x, w))
    got = torch.autograd.grad((select(dense.detach(), x, w, idx) * g).sum(), (x, w))
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r)
    v = torch.randn(b, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: bag_sum(v, w, idx), (v, w))


@pytest.mark.parametrize("transcoder", [False, True])
def test_sparse_sae_equals_dense_reference(tmp_path: Path, transcoder: bool) -> None:
    kw = {"hook_point_in": "blocks.1.ln2.hook_normalized", "hook_point_out": "blocks.1.hook_mlp_out",
          "init_encoder_norm": 0.5} if transcoder else {}
    cfg = tiny_config(tmp_path, **kw)
    sparse, dense = TopKSAE(32, 128, sparse=True), TopKSAE(32, 128, sparse=False)
    sparse.initialize(cfg, torch.Generator().manual_seed(1))
    dense.load_state_dict(sparse.state_dict())
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    grads = []
    for m in (sparse, dense):
        out = m(x, 2)
        loss = batch_norm_mse(out.y_hat, y, y.mean(0), 64)
        loss.backward()
        grads.append([p.grad for p in m.parameters()])
    for gs, gd in zip(*grads, strict=True):
        torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-6)


def test_init_follows_the_released_recipe(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    m = TopKSAE(32, 128)
    m.initialize(cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.decoder_norms(), torch.full((128,), 0.5))
    torch.testing.assert_close(m.W_e, m.W_d)  # encoder = decoder transpose (both [F, D])
    assert m.b_e.abs().sum() == 0 and m.b_d.abs().sum() == 0
    tc = tiny_config(tmp_path, hook_point_in="blocks.1.ln2.hook_normalized",
                     hook_point_out="blocks.1.hook_mlp_out", init_encoder_norm=0.5)
    m.initialize(tc, torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.W_e.norm(dim=1), torch.full((128,), 0.5))
    assert not torch.allclose(m.W_e, m.W_d)


def test_topk_ranks_by_decoder_norm() -> None:
    m = TopKSAE(4, 3)
    with torch.no_grad():
        m.W_e.copy_(torch.eye(3, 4))
        m.W_d.copy_(torch.eye(3, 4) * torch.tensor([[1.0], [10.0], [1.0]]))
    out = m(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), 1)
    assert out.indices.tolist() == [[1]]  # 1*10 beats 3*1


def test_k_and_lr_schedules(tmp_path: Path) -> None:
    from llamascope_sdk.training.recipes import recipe_for

    r = recipe_for("L15R-8x")
    assert k_schedule(r, 0) == 2048 and k_schedule(r, r.k_warmup_steps) == 50
    assert k_schedule(r, r.total_steps - 1) == 50
    mid = k_schedule(r, r.k_warmup_steps // 2)
    assert mid == math.ceil((40.96 + (1 - 40.96) * (r.k_warmup_steps // 2) / r.k_warmup_steps) * 50)
    lam = lr_lambda(r)
    assert lam(0) == pytest.approx(1 / 5000) and lam(4999) == 1.0 and lam(200_000) == 1.0
    assert lam(r.total_steps) == pytest.approx(0.01)
    assert lam(int(0.9 * r.total_steps)) == pytest.approx(0.01 + 0.99 * 0.5, rel=1e-3)


def test_batch_norm_mse_divides_by_the_centred_norm() -> None:
    y = torch.tensor([[3.0, 4.0], [-3.0, -4.0]])
    y_hat = torch.zeros_like(y)
    # centred norms are 5 each; squared errors sum to 25 per row; 4 elements
    assert float(batch_norm_mse(y_hat, y, y.mean(0), 2)) == pytest.approx((25 / 5 * 2) / 4)


def test_bf16_parameters_train_with_sparse_kernels() -> None:
    m = TopKSAE(32, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        m.W_e.normal_(0, 0.1)
        m.W_d.copy_(m.W_e)
    x = torch.randn(64, 32)
    out = m(x, 4)
    batch_norm_mse(out.y_hat, x, x.mean(0), 64).backward()
    assert m.W_d.grad is not None and m.W_d.grad.dtype == torch.bfloat16
    assert (m.W_d.grad.abs().sum(1) > 0).sum() <= 64 * 4  # only selected rows touched
