"""SAE quality metrics as pure tensor functions, plus one streaming accumulator.

Definitions (every function says which one it computes; y = target activation at
``hook_point_out``, y^ = reconstruction, N tokens, F features)::

    L0                  number of non-zero features per token (mean and distribution)
    MSE                 mean over tokens and dimensions of (y - y^)^2, in model units
    EV (centred)        1 - sum_n ||y_n - y^_n||^2 / sum_n ||y_n - mean(y)||^2
                        (the authors' evals.py form; "explained variance" in SAELens >= 6.45.1)
    EV (uncentred)      1 - sum_n ||y_n - y^_n||^2 / sum_n ||y_n||^2
                        (the paper's formula, spec section 5)
    CE                  next-token cross-entropy averaged over the counted targets
    delta LM loss       CE(reconstruction spliced in) - CE(clean)
    KL                  KL(clean || spliced) = sum_v p_clean (log p_clean - log p_spliced),
                        averaged over the same positions as CE
    dead / dense        features that fired on no token / on more than 10% of tokens

Both EV forms pool the sums over all tokens before dividing (one ratio per dataset), rather than
averaging per-batch ratios, so the number does not depend on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

#: A feature firing on more than this fraction of tokens is "dense" (spec 5: <2% above 0.1).
#: The one threshold of the SDK: evaluation counts these, search hides them unless asked, and
#: encode, show and the feature pages mark them.
DENSE_FREQUENCY = 0.1


def log_probs(logits_BTV: torch.Tensor) -> torch.Tensor:
    """log_softmax over the vocabulary, in float32."""
    return F.log_softmax(logits_BTV.float(), dim=-1)


def nll_from_log_probs(log_probs_BTV: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood per position, [B, T-1]: -log p(tokens[t+1] | <=t)."""
    return -log_probs_BTV[:, :-1].gather(-1, tokens_BT[:, 1:, None]).squeeze(-1)


def firing_frequency(counts_F: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Fraction of tokens on which each feature fired, [F] (float64)."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    return counts_F.double() / n_tokens


def dead_features(counts_F: torch.Tensor) -> torch.Tensor:
    """Indices of features that fired on none of the tokens counted."""
    return (counts_F == 0).nonzero().flatten()


def dense_features(counts_F: torch.Tensor, n_tokens: int,
                   threshold: float = DENSE_FREQUENCY) -> torch.Tensor:
    """Indices of features that fired on more than ``threshold`` of the tokens."""
    return (firing_frequency(counts_F, n_tokens) > threshold).nonzero().flatten()


def l0_summary(l0_N: torch.Tensor, bins: int = 20) -> dict[str, object]:
    """Mean, spread, quantiles and a histogram of per-token L0 values (JSON-safe)."""
    v = l0_N.double().flatten()
    if v.numel() == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": 0, "max": 0, "quantiles": {},
                "histogram": {"bin_edges": [], "counts": []}}
    qs = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
    qv = torch.quantile(v, torch.tensor(qs, dtype=torch.float64))
    lo, hi = float(v.min()), float(v.max())
    counts = torch.histc(v, bins=bins, min=lo, max=hi if hi > lo else lo + 1)
    edges = torch.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
            "min": int(lo), "max": int(hi),
            "quantiles": {f"p{round(q * 100)}": float(x) for q, x in zip(qs, qv, strict=True)},
            "histogram": {"bin_edges": [round(float(e), 4) for e in edges],
                          "counts": [int(c) for c in counts]}}


@dataclass
class ReconstructionStats:
    """Streaming sums for L0, MSE, both EVs and firing counts over many batches.

    Sums are kept in float64 so that the centred denominator
    sum ||y||^2 - N ||mean(y)||^2 does not lose precision over millions of tokens.
    """

    d_model: int
    d_sae: int
    n_tokens: int = 0
    sum_sq_err: float = 0.0
    sum_sq_y: float = 0.0
    sum_y: torch.Tensor | None = None  # [D] float64
    fire_counts: torch.Tensor | None = None  # [F] int64
    l0_values: list[torch.Tensor] = field(default_factory=list)

    def update(self, y_ND: torch.Tensor, y_hat_ND: torch.Tensor, acts_NF: torch.Tensor) -> None:
        """Add N tokens (already restricted to the counted positions)."""
        y = y_ND.double().reshape(-1, self.d_model)
        err = y - y_hat_ND.double().reshape(-1, self.d_model)
        fired = acts_NF.reshape(-1, self.d_sae) != 0
        if self.sum_y is None:
            self.sum_y = torch.zeros(self.d_model, dtype=torch.float64, device=y.device)
            self.fire_counts = torch.zeros(self.d_sae, dtype=torch.int64, device=y.device)
        assert self.fire_counts is not None
        self.n_tokens += y.shape[0]
        self.sum_sq_err += float(err.pow(2).sum())
        self.sum_sq_y += float(y.pow(2).sum())
        self.sum_y += y.sum(0)
        self.fire_counts += fired.sum(0).to(self.fire_counts.device)
        self.l0_values.append(fired.sum(-1).cpu())

    @property
    def mse(self) -> float:
        return self.sum_sq_err / max(1, self.n_tokens * self.d_model)

    @property
    def ev_uncentred(self) -> float:
        return 1 - self.sum_sq_err / self.sum_sq_y if self.sum_sq_y > 0 else float("nan")

    @property
    def ev_centred(self) -> float:
        if self.sum_y is None:
            return float("nan")
        var = self.sum_sq_y - float(self.sum_y.pow(2).sum()) / self.n_tokens
        return 1 - self.sum_sq_err / var if var > 0 else float("nan")

    @property
    def l0_all(self) -> torch.Tensor:
        return torch.cat(self.l0_values) if self.l0_values else torch.zeros(0, dtype=torch.int64)


def plot_firing_histogram(frequencies_F: torch.Tensor, path: str | Path, *,
                          title: str = "Feature firing frequency") -> Path:
    """Write a PNG histogram of log10 firing frequency; dead features are counted apart.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'llamascope-sdk[plot]'``).
    """
    try:  # Figure + the Agg canvas: no pyplot, so the user's backend is left alone
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'llamascope-sdk[plot]' "
                          "(or pip install matplotlib)") from exc
    freq = frequencies_F.double().cpu()
    alive = freq[freq > 0]
    n_dead = int((freq == 0).sum())
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if alive.numel():
        ax.hist(torch.log10(alive).numpy(), bins=50, color="#4c72b0")
    ax.axvline(-1, color="#c44e52", linestyle="--", linewidth=1, label="dense (10%)")
    ax.set_xlabel("log10(firing frequency)")
    ax.set_ylabel("features")
    ax.set_title(f"{title}\n{n_dead} dead of {freq.numel()}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
