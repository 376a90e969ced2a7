"""SAEBench's core metrics from the SDK's :func:`~llamascope_sdk.evaluation.evaluate`, with a
reseed spread, under SAEBench's names.

The text is packed into rows of ``context`` tokens (BOS first) and split into ``n_seeds``
disjoint samples of ``tokens`` tokens each (sample s starts at row s * rows_per_sample): the
spread of a core metric is its spread across these samples, not across SAE retrainings.
Each sample is one :func:`evaluate` call (all SAEs share its clean pass) plus one pass of this
module (:func:`_extra`) for what ``evaluate`` does not measure: the zero-ablation forward
(once per output SITE, shared by the SAEs there), norms, cosine, L1 and the legacy EV.

Names and definitions (y = the activation at the SAE's output site, y^ its reconstruction,
counted positions = non-special tokens, as in the whole SDK; SAEBench counts the same ones
with ``exclude_special_tokens_from_reconstruction``):

==================================  ========================================================
model_behavior_preservation         kl_div_with_sae = KL(clean || spliced), kl_div_with_
                                    ablation = KL(clean || output site zeroed), kl_div_score
                                    = (KL_abl - KL_sae) / KL_abl; nats per counted target
model_performance_preservation      ce_loss_without_sae / with_sae / with_ablation and
                                    ce_loss_score = (CE_abl - CE_sae) / (CE_abl - CE_clean)
                                    (the SDK's loss_recovered)
reconstruction_quality              explained_variance = 1 - SSE / sum ||y - mean y||^2 (the
                                    SDK's centred EV, pooled over the sample);
                                    explained_variance_legacy = mean over tokens of 1 - ||y -
                                    y^||^2 / ||y - mean_batch y||^2; mse; cossim = mean cos(y, y^)
shrinkage                           l2_norm_in/out = mean ||y||, ||y^||; l2_ratio = mean
                                    ||y^||/||y||; relative_reconstruction_bias = mean ||y^||^2
                                    / mean <y, y^> (Rajamanoharan et al. 2024, eq. 10)
sparsity                            l0 = mean number of non-zero features; l1 = mean sum of
                                    feature values (model units: ||d_i|| folded in)
misc_metrics                        frac_alive = 1 - frac_dead; freq_over_1/10_percent =
                                    fraction of features firing on > 1% / 10% of tokens;
                                    normalized_freq_over_* = their share of all firings;
                                    average_max_encoder/decoder_cosine_sim over features
==================================  ========================================================

Differences from SAEBench's code, stated: **mse** is the SDK's mean over tokens AND dimensions
of (y - y^)^2; SAEBench divides each token's summed squared error by the number of tokens in
its batch, a number that depends on the batch size, so its ``mse`` is not comparable across
runs (or with this one). **explained_variance**: SAEBench's code forms the total variance as
E||y||^2 minus the square of the mean of y^2 over batches and dimensions, not the per-
dimension variance its comment intends; the SDK uses the intended formula. **Zero ablation**
zeroes the counted positions only (BOS stays clean, as in every spliced pass of the SDK);
SAEBench zeroes every position. Features are read in model units (the folded decoder norm),
which changes L1 but not L0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llamascope_sdk.base.errors import InputError
from llamascope_sdk.benchmark.spread import Spread, spread
from llamascope_sdk.core import metrics as M
from llamascope_sdk.core.hooks import hooked, replace_with
from llamascope_sdk.core.sites import Site, parse_hook_point
from llamascope_sdk.corpus import token_batches
from llamascope_sdk.evaluation.evaluate import EvalResult, evaluate
from llamascope_sdk.loading.capture import capture, keep_mask
from llamascope_sdk.loading.models import special_ids
from llamascope_sdk.loading.sae import SAE

#: SAEBench's metric groups and names, in its order (eval_output_schema_core.json).
GROUPS: dict[str, tuple[str, ...]] = {
    "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
    "model_performance_preservation": ("ce_loss_score", "ce_loss_with_ablation",
                                       "ce_loss_with_sae", "ce_loss_without_sae"),
    "reconstruction_quality": ("explained_variance", "explained_variance_legacy", "mse",
                               "cossim"),
    "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
    "sparsity": ("l0", "l1"),
    "misc_metrics": ("freq_over_1_percent", "freq_over_10_percent",
                     "normalized_freq_over_1_percent", "normalized_freq_over_10_percent",
                     "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
                     "frac_alive"),
}


def packed_rows(tokenizer: Any, text: Any, *, rows: int, context: int) -> torch.Tensor:
    """``rows`` rows of exactly ``context`` tokens (BOS first) of the text, packed.

    Raises:
        InputError: the text is shorter than that.
    """
    got = [ids for ids, _ in token_batches(tokenizer, text, tokens=rows * context,
                                           context=context, batch_size=rows, pack=True)]
    out = torch.cat(got) if got else torch.zeros(0, context, dtype=torch.long)
    if out.shape[0] < rows:
        raise InputError(f"the core text gave {out.shape[0]} rows of {context} tokens; "
                         f"{rows} are needed (lower --core-tokens or --core-seeds, or give a "
                         "longer --text)")
    return out[:rows]


@dataclass
class _Sums:
    """Per-SAE sums of the extra pass over one sample."""

    n: int = 0
    norm_in: float = 0.0
    norm_out: float = 0.0
    ratio: float = 0.0
    sq_out: float = 0.0
    dot: float = 0.0
    l1: float = 0.0
    cos: float = 0.0
    ev_legacy: float = 0.0


@dataclass
class _SiteSums:
    """Per output site: CE and KL with the site zeroed, over counted targets."""

    nll: float = 0.0
    kl: float = 0.0
    n: int = 0
    per_sae: dict[str, _Sums] = field(default_factory=dict)


def _add_sae(s: _Sums, sae: SAE, x_ND: torch.Tensor, y_ND: torch.Tensor) -> None:
    f = sae.encode(x_ND)
    y_hat = sae.decode(f).float()
    y = y_ND.float()
    n_in, n_out = y.norm(dim=-1), y_hat.norm(dim=-1)
    s.n += y.shape[0]
    s.norm_in += float(n_in.sum())
    s.norm_out += float(n_out.sum())
    s.ratio += float((n_out / torch.where(n_in.abs() < 1e-4, 1.0, n_in)).sum())
    s.sq_out += float(n_out.pow(2).sum())
    s.dot += float((y * y_hat).sum())
    s.l1 += float(f.float().sum())
    s.cos += float(torch.nn.functional.cosine_similarity(y, y_hat, dim=-1).sum())
    sse = (y - y_hat).pow(2).sum(-1)
    var = (y - y.mean(0)).pow(2).sum(-1)
    s.ev_legacy += float((1 - sse / var).sum())


@torch.no_grad()
def _extra(model: nn.Module, tokenizer: Any, named: Mapping[str, SAE], ids_ND: torch.Tensor,
           batch_size: int) -> dict[Site, _SiteSums]:
    """The zero-ablation forward per output site, and the per-SAE reconstruction sums."""
    sites = {n: (parse_hook_point(s.hyperparams.hook_point_in),
                 parse_hook_point(s.hyperparams.hook_point_out)) for n, s in named.items()}
    out_sites = {so for _, so in sites.values()}
    sums = {so: _SiteSums() for so in out_sites}
    dev = next(model.parameters()).device
    specials = torch.tensor(sorted(special_ids(tokenizer)), dtype=torch.long)
    for i in range(0, ids_ND.shape[0], batch_size):
        ids = ids_ND[i:i + batch_size].to(dev)
        valid = torch.ones_like(ids, dtype=torch.bool)
        count = keep_mask(ids, valid, specials)
        acts, out = capture(model, {s for p in sites.values() for s in p}, ids, valid,
                            stop_after_last=False)
        log_p = M.log_probs(out.logits)
        tmask = count[:, 1:].float()
        for so in out_sites:
            zeroed = acts[so].clone()
            zeroed[count] = 0
            with hooked(model, {so: replace_with(zeroed)}):
                log_z = M.log_probs(model(input_ids=ids, attention_mask=valid.long(),
                                          use_cache=False).logits)
            kl = (log_p.exp() * (log_p - log_z)).sum(-1)[:, :-1]
            sums[so].kl += float((kl * tmask).sum())
            sums[so].nll += float((M.nll_from_log_probs(log_z, ids) * tmask).sum())
            sums[so].n += int(tmask.sum())
        for name, (si, so) in sites.items():
            s = sums[so].per_sae.setdefault(name, _Sums())
            _add_sae(s, named[name], acts[si][count], acts[so][count])
    return sums


@torch.no_grad()
def max_cosines(W_FD: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """[F]: each row's largest cosine similarity with any OTHER row (chunked, F x F never held)."""
    W = torch.nn.functional.normalize(W_FD.float(), dim=-1)
    out = torch.empty(W.shape[0], dtype=torch.float32, device=W.device)
    for i in range(0, W.shape[0], chunk):
        sim = W[i:i + chunk] @ W.T
        sim[torch.arange(sim.shape[0]), torch.arange(i, i + sim.shape[0])] = -2.0
        out[i:i + chunk] = sim.max(dim=-1).values
    return out.cpu()


def _misc(r: EvalResult, weights: dict[str, float]) -> dict[str, float]:
    freq = r.feature_frequency if r.feature_frequency is not None else torch.zeros(1)
    total = float(freq.sum())
    return {"freq_over_1_percent": float((freq > 0.01).double().mean()),
            "freq_over_10_percent": float((freq > 0.1).double().mean()),
            "normalized_freq_over_1_percent": float(freq[freq > 0.01].sum()) / total if total else 0.0,
            "normalized_freq_over_10_percent": float(freq[freq > 0.1].sum()) / total if total else 0.0,
            "frac_alive": 1.0 - r.frac_dead, **weights}


def _sample_metrics(r: EvalResult, site: _SiteSums, s: _Sums,
                    weights: dict[str, float]) -> dict[str, float]:
    kl_abl, ce_abl = site.kl / max(1, site.n), site.nll / max(1, site.n)
    n = max(1, s.n)
    den = ce_abl - r.ce_clean
    return {"kl_div_with_sae": r.kl_div, "kl_div_with_ablation": kl_abl,
            "kl_div_score": (kl_abl - r.kl_div) / kl_abl if kl_abl else math.nan,
            "ce_loss_without_sae": r.ce_clean, "ce_loss_with_sae": r.ce_spliced,
            "ce_loss_with_ablation": ce_abl,
            "ce_loss_score": (ce_abl - r.ce_spliced) / den if den else math.nan,
            "explained_variance": r.explained_variance_centred,
            "explained_variance_legacy": s.ev_legacy / n, "mse": r.mse, "cossim": s.cos / n,
            "l2_norm_in": s.norm_in / n, "l2_norm_out": s.norm_out / n, "l2_ratio": s.ratio / n,
            "relative_reconstruction_bias": (s.sq_out / n) / (s.dot / n) if s.dot else math.nan,
            "l0": r.l0_mean, "l1": s.l1 / n, **_misc(r, weights)}


@dataclass
class CoreResult:
    """Every core metric of one SAE as a spread over the samples, plus the last EvalResult."""

    metrics: dict[str, Spread]
    evals: list[EvalResult]
    tokens_per_sample: int


@torch.no_grad()
def core_metrics(model: nn.Module, tokenizer: Any, named: Mapping[str, SAE], text: Any, *,
                 n_seeds: int = 3, tokens: int = 8192, context: int = 128,
                 batch_size: int = 8) -> dict[str, CoreResult]:
    """SAEBench core metrics of every SAE in ``named`` over ``n_seeds`` disjoint samples of
    ``tokens`` tokens of ``text`` (packed rows of ``context``; SAEBench's context is 128)."""
    rows = max(1, tokens // context)
    ids = packed_rows(tokenizer, text, rows=rows * n_seeds, context=context)
    weights = {name: {"average_max_encoder_cosine_sim": float(max_cosines(s.W_enc).mean()),
                      "average_max_decoder_cosine_sim": float(max_cosines(s.W_dec).mean())}
               for name, s in named.items()}
    per: dict[str, list[dict[str, float]]] = {n: [] for n in named}
    evals: dict[str, list[EvalResult]] = {n: [] for n in named}
    for k in range(n_seeds):
        sample = ids[k * rows:(k + 1) * rows]
        res = evaluate(model, tokenizer, dict(named), sample, tokens=sample.numel(),
                       context=context, batch_size=batch_size, progress=False)
        extra = _extra(model, tokenizer, named, sample, batch_size)
        for name, sae in named.items():
            site = extra[parse_hook_point(sae.hyperparams.hook_point_out)]
            per[name].append(_sample_metrics(res[name], site, site.per_sae[name], weights[name]))
            evals[name].append(res[name])
    return {name: CoreResult({m: spread([d[m] for d in per[name]]) for m in per[name][0]},
                             evals[name], rows * context) for name in named}


def metric_names() -> Sequence[str]:
    return [m for names in GROUPS.values() for m in names]


__all__ = ["GROUPS", "CoreResult", "core_metrics", "max_cosines", "metric_names", "packed_rows"]
