"""Logit lens of SAE features: which tokens a feature's decoder direction promotes and suppresses.

For feature i with unit decoder direction d_i (a row of ``sae.W_dec``)::

    logits_i = lm_head(final_norm(d_i))          # [vocab]

This is an approximation of the feature's direct effect on the output, stated plainly:

* every layer after the SAE's site is skipped (the direction goes straight to the unembedding,
  as if the later layers passed it through unchanged);
* the model's final RMSNorm is applied to the direction alone, gain included:
  ``g * d_i / sqrt(mean(d_i^2) + eps)``. For a unit direction this is ``g * sqrt(D) * d_i``
  (up to eps), so the scale is fixed and only the ranking of tokens is meaningful; in the real
  model the norm divides by the whole residual's RMS, not the direction's.

It applies to every Llama Scope site (R, A, M and TC all write into the residual stream).
Computed batched over features (one matrix product per chunk of features).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

APPROXIMATION = ("logits = lm_head(final_norm(d_i)) of the unit decoder direction d_i: the layers "
                 "after the SAE's site are skipped, and the final RMSNorm (gain included) is "
                 "applied to the direction alone, so only the ranking of tokens is meaningful.")


@dataclass
class LogitLens:
    """Top-k promoted and suppressed tokens per feature: ids and logits, each [F, k]."""

    top_ids: torch.Tensor
    top_values: torch.Tensor
    bottom_ids: torch.Tensor  # most negative first
    bottom_values: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"top_ids": self.top_ids, "top_values": self.top_values,
                "bottom_ids": self.bottom_ids, "bottom_values": self.bottom_values}


def final_norm_and_unembed(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The final norm (``model.model.norm``) and unembedding (``lm_head``) of a Llama model."""
    inner = getattr(model, "model", model)
    norm = getattr(inner, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if norm is None or head is None:
        raise ValueError(f"{type(model).__name__} has no final norm (model.norm) or lm_head: "
                         "the logit lens needs a Llama-family causal LM")
    return norm, head


def logit_lens(model: Any, directions: torch.Tensor, *, k: int = 10,
               chunk: int = 512) -> LogitLens:
    """Logit lens of the rows of ``directions`` [F, D] (e.g. ``sae.W_dec``), k tokens each way.

    Example:
        >>> lens = logit_lens(model, sae.W_dec, k=10)
        >>> tok.convert_ids_to_tokens(lens.top_ids[4154].tolist())
    """
    norm, head = final_norm_and_unembed(model)
    p = next(head.parameters())
    vocab = int(p.shape[0])
    k = min(k, vocab)
    out: dict[str, list[torch.Tensor]] = {"ti": [], "tv": [], "bi": [], "bv": []}
    with torch.no_grad():
        for start in range(0, directions.shape[0], chunk):
            d = directions[start:start + chunk].to(device=p.device, dtype=p.dtype)
            logits = head(norm(d)).float()  # [chunk, vocab]
            tv, ti = logits.topk(k, dim=1)
            bv, bi = logits.topk(k, dim=1, largest=False)
            for key, t in (("ti", ti), ("tv", tv), ("bi", bi), ("bv", bv)):
                out[key].append(t.cpu())
    cat = {key: torch.cat(v) for key, v in out.items()}
    return LogitLens(cat["ti"], cat["tv"], cat["bi"], cat["bv"])
