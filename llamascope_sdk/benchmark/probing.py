"""Sparse probing, the sae-probes protocol (Kantamneni et al., ICML 2025, "normal" setting).

For one dataset with last-token activations X [N, D] (N <= 5000) and labels y, and one seed:

1. **Split** (sae-probes ``get_train_test_indices``): ``num_train = min(n_total - 100, 1024)``
   and ``num_test = N - num_train - 1``; half the training rows (rounded up) are drawn from
   the positives and the rest from the negatives with ``np.random.RandomState(seed)``, then
   the test rows the same way from what is left, balanced the same way; both are permuted.
2. **Dense baseline**: an L2 logistic regression on X (``find_best_reg``, below).
3. **SAE probes**: the SAE's features on the same rows; features ranked by
   ``|mean(f | y=1) - mean(f | y=0)|`` on the training rows after dividing each feature by its
   mean non-zero |value| (``mean_act_normalization``); for each k, a logistic regression on
   the top k features (L1 by default, as SAEBench's sae-probes wrapper; L2 optional).
4. **Regularisation search** (``find_best_reg``): C in ``logspace(5, -5, 10)``; validation on
   the last ``min(20%, 100)`` training rows when there are at least 128 (a stratified 6-fold
   with shuffling below 128, leave-2-out at 12 or fewer); the C with the best mean validation
   AUC is refit on all training rows, shuffled with ``RandomState(seed)``; the probes are
   scikit-learn ``LogisticRegression(max_iter=1000, random_state=seed)`` (``saga`` for L1).
   Reported on the test rows: AUC, accuracy, weighted F1, and the validation AUC.

Numbers are computed by scikit-learn on the arrays sae-probes would pass it, so on identical
activations they equal sae-probes' own (the parity test runs its functions side by side).
Needs scikit-learn (the ``bench`` extra).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llamascope_sdk.base.errors import DataUnavailableError
from llamascope_sdk.benchmark.datasets import EXTRA_HINT

#: SAEBench's sae-probes wrapper: k values and the SAE probes' penalty.
DEFAULT_KS = (1, 2, 5)
DEFAULT_REG = "l1"
#: sae-probes' default seed; reseeds use 42, 43, ...
BASE_SEED = 42
#: The regularisation grid of ``find_best_reg``.
C_GRID = np.logspace(5, -5, 10)


@dataclass(frozen=True)
class ProbeMetrics:
    """One probe's scores (the fields of sae-probes' ``Metrics``)."""

    test_f1: float
    test_acc: float
    test_auc: float
    val_auc: float


def require_sklearn() -> Any:
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise DataUnavailableError(f"sparse probing needs scikit-learn; {EXTRA_HINT}") from exc
    from sklearn import linear_model, metrics, model_selection

    return linear_model, metrics, model_selection


def split_indices(y: np.ndarray, num_train: int, num_test: int, pos_ratio: float = 0.5,
                  seed: int = BASE_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Balanced train and test row indices, drawn as sae-probes draws them."""
    rng = np.random.RandomState(seed)
    pos, neg = np.where(y == 1)[0], np.where(y == 0)[0]
    n_pos_train = int(np.ceil(pos_ratio * num_train))
    n_pos_test = int(np.ceil(pos_ratio * num_test))
    train_pos = rng.choice(pos, size=n_pos_train, replace=False)
    train_neg = rng.choice(neg, size=num_train - n_pos_train, replace=False)
    test_pos = rng.choice(np.setdiff1d(pos, train_pos), size=n_pos_test, replace=False)
    test_neg = rng.choice(np.setdiff1d(neg, train_neg), size=num_test - n_pos_test,
                          replace=False)
    return (rng.permutation(np.concatenate([train_pos, train_neg])),
            rng.permutation(np.concatenate([test_pos, test_neg])))


def normal_split(y: np.ndarray, n_total: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The "normal" setting's split of rows ``y`` (at most 5000) of a dataset of ``n_total``."""
    num_train = min(n_total - 100, 1024)
    num_test = y.shape[0] - num_train - 1
    if num_train + min(100, num_test) > y.shape[0]:
        raise ValueError(f"{y.shape[0]} rows cannot give {num_train} training and 100 test rows")
    return split_indices(y, num_train, num_test, 0.5, seed)


def _cv_splits(X: np.ndarray, y: np.ndarray, seed: int) -> list[tuple[Any, Any]]:
    _, _, ms = require_sklearn()
    n = X.shape[0]
    if n >= 128:
        val = min(int(0.2 * n), 100)
        return [(list(range(n - val)), list(range(n - val, n)))]
    cv = ms.LeavePOut(2) if n <= 12 else ms.StratifiedKFold(n_splits=6, shuffle=True,
                                                             random_state=seed)
    return [(tr, va) for tr, va in cv.split(X, y) if len(np.unique(y[va])) == 2]


def _model(C: float | None, penalty: str, seed: int) -> Any:
    lm, _, _ = require_sklearn()
    kw: dict[str, Any] = {"random_state": seed, "max_iter": 1000}
    if C is not None:
        kw["C"] = C
    if penalty == "l1":  # the same fit; scikit-learn >= 1.8 spells it l1_ratio=1
        kw.update(solver="saga", **({"l1_ratio": 1.0} if _SKLEARN_L1_RATIO else
                                    {"penalty": "l1"}))
    return lm.LogisticRegression(**kw)


def _sklearn_at_least(major: int, minor: int) -> bool:
    try:
        from importlib.metadata import version

        parts = version("scikit-learn").split(".")
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except Exception:  # noqa: BLE001  (not installed, or an odd version string)
        return False


_SKLEARN_L1_RATIO = _sklearn_at_least(1, 8)


def _val_auc(C: float, X: np.ndarray, y: np.ndarray, splits: list[tuple[Any, Any]],
             penalty: str, seed: int) -> float:
    _, met, _ = require_sklearn()
    scores = []
    for tr, va in splits:
        if len(np.unique(y[tr])) < 2:
            scores.append(0.5)
            continue
        m = _model(C, penalty, seed).fit(X[tr], y[tr])
        scores.append(met.roc_auc_score(y[va], m.predict_proba(X[va])[:, 1]))
    return float(np.mean(scores))


def best_probe(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray,
               y_test: np.ndarray, *, penalty: str = "l2", seed: int = BASE_SEED) -> ProbeMetrics:
    """The regularisation search and the test scores of the chosen probe (``find_best_reg``)."""
    _, met, _ = require_sklearn()
    best_C: float | None = None
    val_scores: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning, as sae-probes silences it
        if X_train.shape[0] > 3:
            splits = _cv_splits(X_train, y_train, seed)
            val_scores = [_val_auc(C, X_train, y_train, splits, penalty, seed) for C in C_GRID]
            best_C = float(C_GRID[int(np.argmax(val_scores))])
        order = np.random.RandomState(seed).permutation(len(X_train))
        model = _model(best_C, penalty, seed).fit(X_train[order], y_train[order])
    proba = model.predict_proba(X_test)[:, 1]
    pred = model.predict(X_test)
    val = (max(val_scores) if best_C is not None
           else met.roc_auc_score(y_train[order], model.predict_proba(X_train[order])[:, 1]))
    return ProbeMetrics(test_f1=float(met.f1_score(y_test, pred, average="weighted")),
                        test_acc=float(met.accuracy_score(y_test, pred)),
                        test_auc=float(met.roc_auc_score(y_test, proba)), val_auc=float(val))


def mean_act_normalization(f_NF: torch.Tensor) -> torch.Tensor:
    """Each feature divided by its mean non-zero |value| (sae-probes' ranking normalisation)."""
    col_mean = f_NF.abs().sum(dim=0) / ((f_NF != 0).sum(dim=0) + 1e-6)
    return f_NF / (col_mean + 1e-6)


def ranked_features(f_train_NF: torch.Tensor, y_train: np.ndarray) -> torch.Tensor:
    """Feature indices by decreasing |mean difference| between the classes (normalised)."""
    f = mean_act_normalization(f_train_NF)
    y = torch.as_tensor(y_train)
    diff = f[y == 1].mean(dim=0) - f[y == 0].mean(dim=0)
    return torch.argsort(torch.abs(diff), descending=True)


@dataclass(frozen=True)
class DatasetProbes:
    """One dataset, one seed: the dense baseline and the SAE probe for every k."""

    dataset: str
    seed: int
    dense: ProbeMetrics
    sae: dict[int, ProbeMetrics]
    features: dict[int, list[int]]  # the k features each SAE probe used


def probe_dataset(name: str, x_ND: torch.Tensor, y: np.ndarray, n_total: int,
                  encode: Callable[[torch.Tensor], torch.Tensor] | None, *, seed: int,
                  ks: Sequence[int] = DEFAULT_KS, reg: str = DEFAULT_REG,
                  dense: ProbeMetrics | None = None) -> DatasetProbes:
    """Run the protocol on one dataset for one seed. ``encode`` maps activations [n, D] to SAE
    features [n, F] (None: the dense baseline only); ``dense`` reuses a baseline already
    computed for this dataset and seed (it does not depend on the SAE)."""
    tr, te = normal_split(y, n_total, seed)
    X = x_ND.float()
    if dense is None:
        dense = best_probe(X[tr].numpy(), y[tr], X[te].numpy(), y[te], penalty="l2", seed=seed)
    sae: dict[int, ProbeMetrics] = {}
    feats: dict[int, list[int]] = {}
    if encode is not None:
        f_tr, f_te = encode(X[tr]).float().cpu(), encode(X[te]).float().cpu()
        order = ranked_features(f_tr, y[tr])
        for k in ks:
            top = order[:k]
            sae[k] = best_probe(f_tr[:, top].numpy(), y[tr], f_te[:, top].numpy(), y[te],
                                penalty=reg, seed=seed)
            feats[k] = [int(i) for i in top]
    return DatasetProbes(name, seed, dense, sae, feats)


__all__ = ["BASE_SEED", "C_GRID", "DEFAULT_KS", "DEFAULT_REG", "DatasetProbes", "ProbeMetrics",
           "best_probe", "mean_act_normalization", "normal_split", "probe_dataset",
           "ranked_features", "split_indices"]
