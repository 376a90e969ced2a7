"""Each metric on hand-computed tensors with a known answer."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from llamascope_sdk.core import metrics as M


# The plain batch formulas, written out: the reference the streaming statistics
# (metrics.ReconstructionStats) and evaluate() are checked against.
def l0(acts_NF: torch.Tensor) -> torch.Tensor:
    """Number of non-zero features per token: [..., F] -> [...] (int64)."""
    return (acts_NF != 0).sum(-1)

def mse(y_ND: torch.Tensor, y_hat_ND: torch.Tensor) -> float:
    """Mean squared error per element, (1/(N D)) sum (y - y^)^2."""
    return float((y_ND.double() - y_hat_ND.double()).pow(2).mean())

def explained_variance(y_ND: torch.Tensor, y_hat_ND: torch.Tensor, *, centred: bool = True) -> float:
    """Explained variance over all tokens of ``y`` [..., D].

    centred=True:  1 - sum ||y - y^||^2 / sum ||y - mean(y)||^2  (mean over tokens)
    centred=False: 1 - sum ||y - y^||^2 / sum ||y||^2            (the paper's formula)
    """
    y = y_ND.double().reshape(-1, y_ND.shape[-1])
    err = (y - y_hat_ND.double().reshape(-1, y.shape[-1])).pow(2).sum()
    ref = y - y.mean(0) if centred else y
    return float(1 - err / ref.pow(2).sum())

def kl_from_log_probs(log_p_BTV: torch.Tensor, log_q_BTV: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) per position, [B, T]."""
    return (log_p_BTV.exp() * (log_p_BTV - log_q_BTV)).sum(-1)

def cross_entropy(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor,
                  target_mask_BT: torch.Tensor | None = None) -> float:
    """Mean next-token cross-entropy (nats) over the counted targets.

    Position t predicts ``tokens[:, t+1]``; ``target_mask_BT`` [B, T] is indexed by the *target*
    position (column 0 is never a target), so ``mask[:, t+1]`` decides whether position t counts.
    """
    nll = M.nll_from_log_probs(M.log_probs(logits_BTV), tokens_BT)
    if target_mask_BT is None:
        return float(nll.mean())
    m = target_mask_BT[:, 1:].to(nll.dtype)
    return float((nll * m).sum() / m.sum())

def kl_divergence(clean_logits_BTV: torch.Tensor, spliced_logits_BTV: torch.Tensor,
                  target_mask_BT: torch.Tensor | None = None) -> float:
    """Mean KL(clean || spliced) of the next-token distributions (nats).

    Averaged over the positions that predict a counted target (the positions ``cross_entropy``
    averages over), or over all positions without a mask.
    """
    kl = kl_from_log_probs(M.log_probs(clean_logits_BTV), M.log_probs(spliced_logits_BTV))
    if target_mask_BT is None:
        return float(kl.mean())
    m = target_mask_BT[:, 1:].to(kl.dtype)
    return float((kl[:, :-1] * m).sum() / m.sum())


def test_l0_counts_nonzero_features_per_token() -> None:
    acts = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    assert l0(acts).tolist() == [2, 0, 1]


def test_l0_summary_mean_quantiles_histogram() -> None:
    s = M.l0_summary(torch.tensor([2, 0, 1, 1]), bins=2)
    assert s["mean"] == 1.0 and s["min"] == 0 and s["max"] == 2
    assert s["quantiles"]["p50"] == 1.0
    assert s["histogram"]["bin_edges"] == [0.0, 1.0, 2.0]
    assert sum(s["histogram"]["counts"]) == 4


def test_mse_per_element() -> None:
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y_hat = torch.tensor([[1.0, 1.0], [3.0, 6.0]])
    assert mse(y, y_hat) == pytest.approx(5 / 4)  # errors 0, 1, 0, 4


def test_explained_variance_centred_and_uncentred_differ_as_defined() -> None:
    y = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0)
    y_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0]])  # SSE = 1
    assert explained_variance(y, y_hat, centred=True) == pytest.approx(1 - 1 / 2)
    assert explained_variance(y, y_hat, centred=False) == pytest.approx(1 - 1 / 10)
    assert explained_variance(y, y, centred=True) == 1.0


def test_streaming_stats_equal_one_shot_formulas() -> None:
    y = torch.randn(50, 8) + 3.0  # a large mean makes centred and uncentred differ
    y_hat = y + 0.3 * torch.randn(50, 8)
    acts = torch.relu(torch.randn(50, 16))
    st = M.ReconstructionStats(8, 16)
    st.update(y[:20], y_hat[:20], acts[:20])
    st.update(y[20:], y_hat[20:], acts[20:])
    assert st.n_tokens == 50
    assert st.mse == pytest.approx(mse(y, y_hat))
    assert st.ev_centred == pytest.approx(explained_variance(y, y_hat, centred=True))
    assert st.ev_uncentred == pytest.approx(explained_variance(y, y_hat, centred=False))
    assert st.ev_centred < st.ev_uncentred
    assert st.fire_counts.tolist() == (acts != 0).sum(0).tolist()
    assert st.l0_all.tolist() == l0(acts).tolist()


def test_cross_entropy_known_values_and_target_mask() -> None:
    # V = 2; position 0 predicts token 1 with p = 3/4, position 1 predicts token 0 with p = 1/2.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 5.0]]])
    tokens = torch.tensor([[0, 1, 0]])
    expected = [-math.log(3 / 4), -math.log(1 / 2)]
    assert M.nll_from_log_probs(M.log_probs(logits), tokens)[0].tolist() == pytest.approx(expected)
    assert cross_entropy(logits, tokens) == pytest.approx(sum(expected) / 2)
    mask = torch.tensor([[True, True, False]])  # target at position 2 is excluded
    assert cross_entropy(logits, tokens, mask) == pytest.approx(-math.log(3 / 4))


def test_kl_divergence_is_clean_given_spliced() -> None:
    clean = torch.log(torch.tensor([[[0.5, 0.5]]]))
    spliced = torch.log(torch.tensor([[[0.25, 0.75]]]))
    kl_clean_spliced = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_spliced_clean = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_divergence(clean, spliced) == pytest.approx(kl_clean_spliced)
    assert kl_divergence(spliced, clean) == pytest.approx(kl_spliced_clean)
    assert kl_divergence(clean, clean) == 0.0


def test_dead_and_dense_features() -> None:
    counts = torch.tensor([0, 5, 10, 11, 100])
    assert M.dead_features(counts).tolist() == [0]
    # 10/100 is exactly 10%: dense means MORE than 10%.
    assert M.dense_features(counts, 100).tolist() == [3, 4]
    assert M.firing_frequency(counts, 100).tolist() == pytest.approx([0, 0.05, 0.1, 0.11, 1.0])
    with pytest.raises(ValueError, match="n_tokens"):
        M.firing_frequency(counts, 0)


def test_firing_histogram_png(tmp_path) -> None:
    freq = torch.tensor([0.0, 0.0, 1e-4, 1e-3, 0.02, 0.5])
    path = M.plot_firing_histogram(freq, tmp_path / "hist.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_firing_histogram_without_matplotlib_names_the_extra(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"llamascope-sdk\[plot\]"):
        M.plot_firing_histogram(torch.tensor([0.1]), tmp_path / "x.png")
