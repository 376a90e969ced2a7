"""Each metric's results as a :class:`~llamascope_sdk.benchmark.report.MetricOutput`: SAEBench's
metric categories and per-item details, the spreads over seeds and the headline numbers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llamascope_sdk.benchmark.absorption import AbsorptionResult
from llamascope_sdk.benchmark.autointerp import AutointerpResult
from llamascope_sdk.benchmark.core import GROUPS, CoreResult
from llamascope_sdk.benchmark.probing import DatasetProbes, ProbeMetrics
from llamascope_sdk.benchmark.report import MetricOutput
from llamascope_sdk.benchmark.spread import Spread, spread

_FIELDS = {"accuracy": "test_acc", "auc": "test_auc", "f1": "test_f1"}


def core_output(r: CoreResult, config: dict[str, Any]) -> MetricOutput:
    cats: dict[str, dict[str, Any]] = {g: {m: r.metrics[m].mean for m in names}
                                       for g, names in GROUPS.items()}
    n = r.tokens_per_sample
    cats["token_stats"] = {"total_tokens_eval_reconstruction": n,
                           "total_tokens_eval_sparsity_variance": n}
    return MetricOutput("core", config, cats, [], dict(r.metrics),
                        [f"spread over {r.metrics['l0'].n} disjoint samples of {n} tokens"],
                        ("l0", "explained_variance", "ce_loss_score", "kl_div_score",
                         "frac_alive"))


def _mean(rows: Sequence[ProbeMetrics], key: str) -> float:
    return sum(getattr(m, key) for m in rows) / len(rows)


def probing_output(per_seed: Mapping[int, Sequence[DatasetProbes]], ks: Sequence[int],
                   config: dict[str, Any]) -> MetricOutput:
    """Per seed: the mean over datasets; the spread is over seeds."""
    spreads: dict[str, Spread] = {}
    seeds = sorted(per_seed)
    for name, key in _FIELDS.items():
        spreads[f"llm_test_{name}"] = spread([_mean([d.dense for d in per_seed[s]], key)
                                              for s in seeds])
        for k in ks:
            spreads[f"sae_top_{k}_test_{name}"] = spread(
                [_mean([d.sae[k] for d in per_seed[s]], key) for s in seeds])
    llm = {k: v.mean for k, v in spreads.items() if k.startswith("llm_")}
    sae = {k: v.mean for k, v in spreads.items() if k.startswith("sae_")}
    details = []
    for i, d0 in enumerate(per_seed[seeds[0]]):
        rows = [per_seed[s][i] for s in seeds]
        det: dict[str, Any] = {"dataset_name": d0.dataset}
        for name, key in _FIELDS.items():
            det[f"llm_test_{name}"] = _mean([r.dense for r in rows], key)
            for k in ks:
                det[f"sae_top_{k}_test_{name}"] = _mean([r.sae[k] for r in rows], key)
        det["sae_metrics_by_k"] = {str(k): {f"test_{n}": det[f"sae_top_{k}_test_{n}"]
                                            for n in _FIELDS} for k in ks}
        details.append(det)
    head = ("llm_test_auc", f"sae_top_{min(ks)}_test_auc", f"sae_top_{max(ks)}_test_auc")
    notes = [f"mean over {len(details)} datasets per seed; spread over seeds {seeds}",
             "llm = the dense-activation baseline (L2 logistic regression on the activations)"]
    return MetricOutput("probing", config, {"llm": llm, "sae": sae}, details, spreads, notes,
                        head)


def absorption_output(r: AbsorptionResult, config: dict[str, Any]) -> MetricOutput:
    s = {"mean_absorption_fraction_score": r.mean_absorption_fraction_score,
         "mean_full_absorption_score": r.mean_full_absorption_score,
         "mean_num_split_features": r.mean_num_split_features}
    first = r.letters[0] if r.letters else []
    kept = [x for x in first if x.probe_f1 > 0.6]
    mean = {k: v.mean for k, v in s.items()}

    def std(key: str) -> float:
        vals = [getattr(x, key) for x in kept]
        m = sum(vals) / len(vals) if vals else 0.0
        return (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0

    mean.update(std_dev_absorption_fraction_score=std("mean_absorption_fraction"),
                std_dev_full_absorption_score=std("full_absorption_rate"),
                std_dev_num_split_features=(
                    spread([len(x.split_features) for x in kept]).std if kept else 0.0))
    details = [{"first_letter": x.letter, "mean_absorption_fraction": x.mean_absorption_fraction,
                "full_absorption_rate": x.full_absorption_rate,
                "num_full_absorption": x.num_full_absorption,
                "num_probe_true_positives": x.n_probe_true_positives,
                "num_split_features": len(x.split_features)} for x in kept]
    notes = [f"{len(kept)} of 26 letters passed the probe-F1 gate (> 0.6) with the first seed"
             if kept else "no letter passed the probe-F1 gate (> 0.6): the model does not "
             "spell well enough at this site (SAEBench: not meaningful below ~1B parameters)",
             "std_dev_* are across letters (SAEBench's); the reseed spread is in spreads"]
    return MetricOutput("absorption", config, {"mean": mean}, details, s, notes,
                        ("mean_absorption_fraction_score", "mean_full_absorption_score"))


def autointerp_output(r: AutointerpResult, config: dict[str, Any]) -> MetricOutput:
    scores = [f.score for row in r.per_seed[:1] for f in row if f.score is not None]
    m = sum(scores) / len(scores) if scores else float("nan")
    sd = (sum((x - m) ** 2 for x in scores) / (len(scores) - 1)) ** 0.5 if len(scores) > 1 else 0.0
    details = [{"feature": f.feature, "explanation": f.explanation, "score": f.score}
               for row in r.per_seed for f in row]
    return MetricOutput("autointerp", config,
                        {"autointerp": {"autointerp_score": r.score.mean,
                                        "autointerp_std_dev": sd}},
                        details, {"autointerp_score": r.score},
                        [f"{r.unparsable} feature(s) left out: a reply did not parse",
                         "autointerp_std_dev is across features (first seed, SAEBench's)"],
                        ("autointerp_score",))


__all__ = ["absorption_output", "autointerp_output", "core_output", "probing_output"]
