"""Sparse probing against sae-probes' own functions, on identical activations.

sae-probes' package ``__init__`` imports TransformerLens, so its functions are taken from its
installed source files with :mod:`ast` (the function and class definitions named below, and
the module's imports that do not need TransformerLens, SAELens or xgboost) and run as they
are. Skipped, with the reason, when sae-probes or scikit-learn is not installed (the ``bench``
extra); the protocol pieces that need neither are tested below them.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llamascope_sdk.benchmark import probing as P
from llamascope_sdk.benchmark.spread import spread, within_noise

_SKIP_IMPORTS = ("transformer_lens", "sae_lens", "xgboost", "sae_probes")


def _sae_probes_file(name: str) -> Path | None:
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / name


def _load(name: str, wanted: set[str]) -> dict[str, Any]:
    """Run the imports and the ``wanted`` definitions of sae_probes/<name> in a namespace."""
    path = _sae_probes_file(name)
    if path is None:
        pytest.skip("sae-probes is not installed (pip install --no-deps sae-probes==0.4.2)")
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (the bench extra)")
    tree = ast.parse(path.read_text())
    ns: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            if mod and mod.split(".")[0] in _SKIP_IMPORTS:
                continue
        elif not (isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in wanted):
            continue
        exec(compile(ast.Module([node], []), str(path), "exec"), ns)  # noqa: S102
    missing = wanted - set(ns)
    assert not missing, f"sae-probes {name} has no {missing}"
    return ns


def _data(n: int, d: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Activations with a planted direction, so the probes have something to find."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.randperm(n, generator=g) % 2).numpy()  # balanced: every split below fits
    x = torch.randn(n, d, generator=g)
    x[:, 0] += torch.as_tensor(y).float() * 1.5
    x[:, 1] += torch.as_tensor(y).float() * 0.7
    return x, y


def _relu_encoder(d: int, f: int) -> Any:
    w = torch.randn(d, f, generator=torch.Generator().manual_seed(7))
    return lambda x: torch.relu(x @ w - 1.0)


def test_split_matches_sae_probes() -> None:
    ref = _load("utils_data.py", {"get_train_test_indices"})["get_train_test_indices"]
    _, y = _data(900, 4, 0)
    for seed in (42, 43):
        ours = P.split_indices(y, 600, 299, 0.5, seed)
        theirs = ref(y, 600, 299, 0.5, seed)
        assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])


@pytest.mark.parametrize("penalty", ["l2", "l1"])
def test_probe_metrics_match_find_best_reg(penalty: str) -> None:
    """The dense baseline (l2) and an SAE-style probe (l1, k features): all four metrics."""
    ns = _load("utils_training.py", {"Metrics", "BestClassifierResults", "get_cv", "get_splits",
                                     "find_best_reg"})
    x, y = _data(700, 12, 1)
    tr, te = P.split_indices(y, 400, 299, 0.5, 42)
    X = x.numpy()
    ours = P.best_probe(X[tr], y[tr], X[te], y[te], penalty=penalty, seed=42)
    theirs = ns["find_best_reg"](X[tr], y[tr], X[te], y[te], parallel=False, penalty=penalty,
                                 seed=42).metrics
    for field in ("test_auc", "test_acc", "test_f1", "val_auc"):
        assert abs(getattr(ours, field) - getattr(theirs, field)) <= 1e-6, field


def test_small_train_sets_use_the_same_cross_validation() -> None:
    ns = _load("utils_training.py", {"Metrics", "BestClassifierResults", "get_cv", "get_splits",
                                     "find_best_reg"})
    x, y = _data(300, 6, 2)
    for n_train in (10, 60):  # leave-2-out and stratified 6-fold
        tr, te = P.split_indices(y, n_train, 100, 0.5, 43)
        X = x.numpy()
        ours = P.best_probe(X[tr], y[tr], X[te], y[te], seed=43)
        theirs = ns["find_best_reg"](X[tr], y[tr], X[te], y[te], seed=43).metrics
        assert abs(ours.test_auc - theirs.test_auc) <= 1e-6
        assert abs(ours.val_auc - theirs.val_auc) <= 1e-6


def test_sae_pipeline_matches_run_sae_eval() -> None:
    """Ranking (mean_act_normalization + |mean diff|) then the probe for each k, as
    run_sae_eval does it, against probe_dataset on the same activations and SAE."""
    tr_ns = _load("utils_training.py", {"Metrics", "BestClassifierResults", "get_cv",
                                        "get_splits", "find_best_reg"})
    ev_ns = _load("run_sae_evals.py", {"get_sorted_indices", "mean_act_normalization"})
    split = _load("utils_data.py", {"get_train_test_indices"})["get_train_test_indices"]
    x, y = _data(800, 16, 3)
    encode = _relu_encoder(16, 64)
    n_total = 800
    got = P.probe_dataset("synthetic", x, y, n_total, encode, seed=42, ks=(1, 2, 5), reg="l1")
    num_train = min(n_total - 100, 1024)
    tr, te = split(y, num_train, x.shape[0] - num_train - 1, 0.5, 42)
    f_tr, f_te = encode(x[tr]).float(), encode(x[te]).float()
    yt = torch.tensor(y[tr])
    order = ev_ns["get_sorted_indices"](f_tr, yt, ev_ns["mean_act_normalization"])
    for k in (1, 2, 5):
        top = order[:k]
        ref = tr_ns["find_best_reg"](X_train=f_tr[:, top], y_train=yt, X_test=f_te[:, top],
                                     y_test=torch.tensor(y[te]), penalty="l1", seed=42).metrics
        assert got.features[k] == top.tolist()
        assert abs(got.sae[k].test_auc - ref.test_auc) <= 1e-6
        assert abs(got.sae[k].test_acc - ref.test_acc) <= 1e-6
    dense = tr_ns["find_best_reg"](x[tr], y[tr], x[te], y[te], seed=42).metrics
    assert abs(got.dense.test_auc - dense.test_auc) <= 1e-6


# ------------------------------------------------- protocol pieces that need no extra
def test_split_is_balanced_disjoint_and_seeded() -> None:
    _, y = _data(1000, 2, 4)
    tr, te = P.normal_split(y, 1000, 42)
    assert len(tr) == 900 and len(te) == 99
    assert not set(tr) & set(te)
    assert int(y[tr].sum()) == 450 and int(y[te].sum()) == 50
    tr2, _ = P.normal_split(y, 1000, 43)
    assert not np.array_equal(tr, tr2)
    assert np.array_equal(tr, P.normal_split(y, 1000, 42)[0])


def test_ranking_uses_normalised_mean_difference() -> None:
    # feature 0: large values, small normalised gap; feature 1: small values, large gap
    f = torch.tensor([[10.0, 1.0], [9.0, 1.0], [10.0, 0.0], [11.0, 0.0]])
    y = np.array([1, 1, 0, 0])
    # normalised: col0 / 10 -> gap 0.1; col1 / 1 -> gap 1.0
    assert P.ranked_features(f, y).tolist() == [1, 0]


def test_spread_and_noise_rule() -> None:
    a, b = spread([0.80, 0.82, 0.81]), spread([0.90, 0.91, 0.89])
    assert abs(a.mean - 0.81) < 1e-12 and abs(a.std - 0.01) < 1e-12 and a.n == 3
    assert within_noise(a, b) is False  # a gap of 0.09 against SE(diff) = 0.0082
    assert within_noise(a, spread([0.81, 0.83, 0.80])) is True
    assert within_noise(a, spread([0.5])) is None
