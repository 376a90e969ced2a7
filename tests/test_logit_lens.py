"""The logit lens equals lm_head(final RMSNorm(d_i)) written out as a plain matrix product."""

from __future__ import annotations

import torch

from llamascope_sdk.core.logit_lens import logit_lens


def test_logit_lens_is_a_matrix_product(tiny_llama):
    model = tiny_llama
    dirs = torch.randn(37, model.config.hidden_size)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    lens = logit_lens(model, dirs, k=5, chunk=8)  # several chunks
    g = model.model.norm.weight.detach()
    eps = model.model.norm.variance_epsilon
    W_U = model.lm_head.weight.detach()  # [vocab, D]
    normed = g * dirs / torch.sqrt(dirs.pow(2).mean(1, keepdim=True) + eps)
    logits = normed @ W_U.T
    want_v, want_i = logits.topk(5, dim=1)
    low_v, low_i = logits.topk(5, dim=1, largest=False)
    torch.testing.assert_close(lens.top_values, want_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lens.bottom_values, low_v, rtol=1e-5, atol=1e-5)
    assert torch.equal(lens.top_ids, want_i) and torch.equal(lens.bottom_ids, low_i)
    assert lens.top_ids.shape == (37, 5)
