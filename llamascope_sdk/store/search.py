"""Search: from a concept (a text) to the features most specific to it, and a steer command.

Scores, for the non-special tokens of ``prompt`` (mean activation m_i of feature i there):

* alone, like tf-idf: ``score_i = (m_i / typical_i) * -log(frequency_i)`` - how strongly the
  feature fires here relative to its usual size, down-weighted when it fires everywhere
  (frequency and typical come from mined statistics; a feature never seen firing in mining
  counts as frequency 1/(n_tokens+1) and typical m_i);
* against ``vs``: ``score_i = m_i - m_i(vs)``, the difference of mean activations.

Dense features (frequency above :data:`~llamascope_sdk.core.metrics.DENSE_FREQUENCY`, 10% of
tokens) are left out unless ``include_dense``; then they are marked ``dense``. A hit that never
fired in the mined statistics has no typical activation: :func:`~llamascope_sdk.store.view.
steer_command` suggests no steer for it.

``output_scores`` (a store's :class:`~llamascope_sdk.store.scores.FeatureScores`) re-rank:
the ``5 x top`` most specific features are sorted by their output score instead, so the list
favours features that also steer (Arad et al. 2025).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from llamascope_sdk.core.feature_stats import FeatureStats
from llamascope_sdk.core.metrics import DENSE_FREQUENCY
from llamascope_sdk.loading.models import special_ids
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.steering.reading import read_features


@dataclass
class SearchHit:
    feature: int
    score: float
    prompt_mean: float
    vs_mean: float | None
    typical: float
    frequency: float
    dense: bool
    label: str | None
    output_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_activation(model: Any, tokenizer: Any, sae: SAE, text: str) -> torch.Tensor:
    """Mean activation [F] of every feature over the non-special tokens of ``text``."""
    r = read_features(model, tokenizer, sae, text, top_k=0)
    acts = r.acts[next(iter(r.acts))].float()
    keep = ~torch.isin(torch.tensor(r.token_ids), torch.tensor(sorted(special_ids(tokenizer))))
    if not bool(keep.any()):
        raise ValueError("the text holds no non-special tokens")
    return acts[keep.to(acts.device)].mean(0).cpu()


def score_features(prompt_mean: torch.Tensor, stats: FeatureStats,
                   vs_mean: torch.Tensor | None = None) -> torch.Tensor:
    """The scores of the module docstring, [F]; features silent on the prompt score <= 0."""
    if vs_mean is not None:
        return prompt_mean - vs_mean
    floor = 1.0 / (stats.n_tokens + 1)
    freq = stats.frequency.float().clamp(min=floor, max=1.0)
    typical = torch.where(stats.typical > 0, stats.typical.float(), prompt_mean)
    ratio = torch.where(typical > 0, prompt_mean / typical.clamp(min=1e-12), 0.0)
    return ratio * -torch.log(freq)


def search_features(model: Any, tokenizer: Any, sae: SAE, prompt: str, *, vs: str | None = None,
                    stats: FeatureStats | None = None, top: int = 10,
                    include_dense: bool = False,
                    output_scores: torch.Tensor | None = None) -> list[SearchHit]:
    """The ``top`` features most specific to ``prompt`` (or to it against ``vs``).

    Args:
        stats: mined statistics (a store's ``stats``); default ``sae.stats``.
        include_dense: keep dense features (frequency > ``DENSE_FREQUENCY``), marked ``dense``.
        output_scores: [F] output scores; re-rank the 5 x ``top`` most specific by them.

    Raises:
        ValueError: no statistics (mine them first: ``llamascope inspect``).
    """
    stats = stats if stats is not None else sae.stats
    if stats is None:
        raise ValueError(f"{sae.name} has no feature statistics: mine them first with "
                         "`llamascope inspect --sae ... --dataset FILE` and pass --store")
    stats.check(sae.d_sae, sae.name)
    pm = mean_activation(model, tokenizer, sae, prompt)
    vm = mean_activation(model, tokenizer, sae, vs) if vs is not None else None
    score = score_features(pm, stats, vm)
    dense = stats.frequency > DENSE_FREQUENCY
    score = score.masked_fill(pm <= 0, -math.inf)
    if not include_dense:
        score = score.masked_fill(dense, -math.inf)
    pool = top if output_scores is None else 5 * top
    k = min(pool, int(torch.isfinite(score).sum()))
    vals, idx = score.topk(k) if k > 0 else (torch.empty(0), torch.empty(0, dtype=torch.long))
    if output_scores is not None:
        out = output_scores.float().cpu()[idx].nan_to_num(nan=-math.inf)
        order = out.argsort(descending=True, stable=True)[:top]
        vals, idx = vals[order], idx[order]
    return [SearchHit(int(i), float(v), float(pm[i]), None if vm is None else float(vm[i]),
                      float(stats.typical[i]), float(stats.frequency[i]), bool(dense[i]),
                      sae.labels.get(int(i)),
                      _finite(output_scores, i))
            for v, i in zip(vals.tolist(), idx.tolist(), strict=True)]



def _finite(scores: torch.Tensor | None, i: int) -> float | None:
    v = None if scores is None else float(scores[i])
    return v if v is not None and math.isfinite(v) else None
