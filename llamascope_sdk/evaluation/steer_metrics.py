"""The LLM-free measurements of a steering sweep, each one batched forward of the UNSTEERED model.

For a continuation c of a prompt p (new tokens only, a trailing EOS dropped):

* ``concept_activation``: the feature's own activation, re-encoded by the SAE from the clean
  model's activations on ``p + c``, averaged over the tokens of c (special tokens excluded);
* ``lens_logprob``: ``log Σ_{t∈L} p(t | p + c_≤j)`` averaged over the positions j of c, with L the
  feature's top-10 logit-lens tokens: how strongly the text invites what the feature promotes;
* ``concept_logprob``: with a concept text k, ``(1/|k|) Σ_j log p(k_j | p + c + k_<j)``: how
  expected the concept text is after the continuation;
* ``nll``: mean negative log-likelihood of c given p; ``exp(nll)`` is its perplexity under the
  unsteered model (the fluency measure);
* ``distinct``: distinct-2 of c, the number of different token bigrams over the number of
  bigrams (Li et al. 2016). Perplexity alone rewards degenerate repetition (" of of of ..."
  is easy to predict once it has started); distinct-2 falls towards 0 on it.

Side effects of an edit, on neutral text n (BOS + text, the edit at every position):
``kl`` = mean over positions of KL(p_clean(·|n_≤j) || p_edit(·|n_≤j)) and ``dloss`` = mean
next-token cross-entropy with the edit minus without.

:func:`diffmean_direction` is AxBench's DiffMean: the mean activation at the SAE's output site
over the (non-special) tokens of concept texts minus the mean over neutral texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llamascope_sdk.core.hooks import capture_into, hooked
from llamascope_sdk.core.sites import parse_hook_point
from llamascope_sdk.loading.models import model_device, special_ids, tokenize
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.steering.interventions import Intervention
from llamascope_sdk.steering.row_edits import RowEdit, as_row_edits, row_hooks

#: How many rows one scoring forward holds (logits are rows x tokens x vocab floats).
ROWS_PER_FORWARD = 16


@dataclass
class ContinuationScores:
    """Per continuation: the quantities of the module docstring (NaN when c is empty)."""

    concept_activation: float
    lens_logprob: float
    concept_logprob: float | None
    nll: float
    n_tokens: int
    distinct: float = float("nan")


def distinct_2(ids: Sequence[int]) -> float:
    """Different bigrams / bigrams of ``ids`` (NaN with fewer than 2 tokens)."""
    pairs = list(zip(ids[:-1], ids[1:], strict=True))
    return len(set(pairs)) / len(pairs) if pairs else float("nan")


def _pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        valid[b, :len(r)] = True
    return ids, valid


def strip_stop(ids: Sequence[int], stop: set[int]) -> list[int]:
    """``ids`` without trailing special tokens (a generation that ended with EOS)."""
    out = list(ids)
    while out and out[-1] in stop:
        out.pop()
    return out


def score_continuations(model: Any, tokenizer: Any, sae: SAE, feature: int,
                        prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                        lens_ids: Sequence[int], concept_ids: Sequence[int] | None = None
                        ) -> list[ContinuationScores]:
    """Score each ``continuations[i]`` (ids) of ``prompts[i]`` (ids, BOS included); see module doc."""
    site_in = parse_hook_point(sae.hyperparams.hook_point_in)
    special = special_ids(tokenizer)
    dev = model_device(model)
    lens = torch.tensor(list(lens_ids), dtype=torch.long, device=dev)
    kept = [strip_stop(c, special) for c in continuations]
    extra = list(concept_ids or [])
    out: list[ContinuationScores] = []
    for start in range(0, len(prompts), ROWS_PER_FORWARD):
        P = [list(p) for p in prompts[start:start + ROWS_PER_FORWARD]]
        C = kept[start:start + ROWS_PER_FORWARD]
        ids, valid = _pad([p + c + extra for p, c in zip(P, C, strict=True)], 0)
        ids, valid = ids.to(dev), valid.to(dev)
        acts: dict[str, torch.Tensor] = {}
        with torch.no_grad(), hooked(model, {site_in: capture_into(acts, "x")}):
            logits = model(input_ids=ids, attention_mask=valid.long(), use_cache=False).logits
        logp = torch.log_softmax(logits.float(), -1)  # [B, T, V]
        for b, (p, c) in enumerate(zip(P, C, strict=True)):
            n_p, n_c = len(p), len(c)
            if n_c == 0:
                out.append(ContinuationScores(float("nan"), float("nan"), None, float("nan"), 0))
                continue
            cont = torch.arange(n_p, n_p + n_c, device=dev)
            nll = -float(logp[b, cont - 1].gather(1, ids[b, cont][:, None]).mean())
            lens_lp = float(torch.logsumexp(logp[b, cont][:, lens], -1).mean())
            x = acts["x"][b, cont].to(device=sae.device, dtype=sae.dtype)
            f = sae.encode_features(x, [feature])[:, 0].float()
            normal = torch.tensor([t not in special for t in c], device=f.device)
            act = float(f[normal].mean()) if bool(normal.any()) else float("nan")
            concept = None
            if extra:
                k = torch.arange(n_p + n_c, n_p + n_c + len(extra), device=dev)
                concept = float(logp[b, k - 1].gather(1, ids[b, k][:, None]).mean())
            out.append(ContinuationScores(act, lens_lp, concept, nll, n_c, distinct_2(c)))
    return out


def side_effects(model: Any, tokenizer: Any, texts: Sequence[str],
                 edit_lists: Sequence[Sequence[Intervention | RowEdit]]) -> list[tuple[float, float]]:
    """(kl, dloss) of each edit list on the neutral ``texts`` (module docstring), batched:
    every (edit list, text) pair is one row; rows of one forward carry their own edits."""
    dev = model_device(model)
    special = torch.tensor(sorted(special_ids(tokenizer)), device=dev)
    rows = [tokenize(tokenizer, t)[0].tolist() for t in texts]
    ids, valid = _pad(rows, 0)
    ids, valid = ids.to(dev), valid.to(dev)
    keep = valid & ~torch.isin(ids, special)
    target_ok = valid[:, 1:]
    with torch.no_grad():
        clean = torch.log_softmax(model(input_ids=ids, attention_mask=valid.long(),
                                        use_cache=False).logits.float(), -1)
    clean_ce = -clean[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    edits = [as_row_edits(model, e) for e in edit_lists]
    pairs = [(e, t) for e in range(len(edits)) for t in range(len(rows))]
    kl_sum = torch.zeros(len(edits))
    dl_sum = torch.zeros(len(edits))
    per_chunk = max(1, ROWS_PER_FORWARD // 2)
    for start in range(0, len(pairs), per_chunk):
        chunk = pairs[start:start + per_chunk]
        t_idx = torch.tensor([t for _, t in chunk], device=dev)
        b_ids, b_valid, b_keep = ids[t_idx], valid[t_idx], keep[t_idx]
        T = b_ids.shape[1]
        pos = torch.arange(T, device=dev).expand(len(chunk), T)
        hooks = row_hooks([edits[e] for e, _ in chunk], pos, [T] * len(chunk), b_keep)
        with torch.no_grad(), hooked(model, hooks):
            lp = torch.log_softmax(model(input_ids=b_ids, attention_mask=b_valid.long(),
                                         use_cache=False).logits.float(), -1)
        for j, (e, t) in enumerate(chunk):
            m = valid[t]
            kl = (clean[t][m].exp() * (clean[t][m] - lp[j][m])).sum(-1).mean()
            ce = -lp[j, :-1].gather(1, ids[t, 1:, None])[:, 0]
            ok = target_ok[t]
            kl_sum[e] += float(kl)
            dl_sum[e] += float((ce[ok] - clean_ce[t][ok]).mean())
    n = len(rows)
    return [(float(kl_sum[e] / n), float(dl_sum[e] / n)) for e in range(len(edits))]


def diffmean_direction(model: Any, tokenizer: Any, sae: SAE, concept_texts: Sequence[str],
                       neutral_texts: Sequence[str]) -> torch.Tensor:
    """Mean activation [D] at ``sae``'s output site over the non-special tokens of
    ``concept_texts`` minus that over ``neutral_texts`` (AxBench's DiffMean), fp32."""
    site = parse_hook_point(sae.hyperparams.hook_point_out)
    dev = model_device(model)
    special = torch.tensor(sorted(special_ids(tokenizer)), device=dev)

    def mean(texts: Sequence[str]) -> torch.Tensor:
        total, count = None, 0
        for t in texts:
            ids = tokenize(tokenizer, t).to(dev)
            acts: dict[str, torch.Tensor] = {}
            with torch.no_grad(), hooked(model, {site: capture_into(acts, "y")},
                                         stop_after_last=True):
                model(input_ids=ids, use_cache=False)
            keep = ~torch.isin(ids[0], special)
            y = acts["y"][0][keep].float().sum(0)
            total = y if total is None else total + y
            count += int(keep.sum())
        if total is None or count == 0:
            raise ValueError("DiffMean needs texts with at least one non-special token")
        return total / count

    return (mean(concept_texts) - mean(neutral_texts)).cpu()
