"""Reading features off a model: per-token activations of a text, and per-feature statistics.

``read_features`` runs one text through the model with SAEs attached and returns per-token
activations and top features; ``measure_feature_stats`` measures the typical activation that
relative steering strengths are expressed in and sets it as ``sae.stats``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llamascope_sdk.core.feature_stats import FeatureStats
from llamascope_sdk.core.metrics import DENSE_FREQUENCY
from llamascope_sdk.loading.models import check_fits_window, model_device, special_ids, tokenize
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.steering.attachment import attach


@dataclass
class FeatureReading:
    """Per-token SAE features of one text.

    ``acts[name]`` is [seq, F] (zero at special tokens unless included); ``top[name][t]`` lists up
    to top_k (feature, activation) pairs of token t, largest first, non-zero only.
    """

    tokens: list[str]
    token_ids: list[int]
    acts: dict[str, torch.Tensor]
    top: dict[str, list[list[tuple[int, float]]]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: tokens, ids, top features and L0 per token (not the dense activations)."""
        return {
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "top": {n: [[[i, v] for i, v in row] for row in rows] for n, rows in self.top.items()},
            "l0": {n: [int(c) for c in (a > 0).sum(-1).tolist()] for n, a in self.acts.items()},
        }


def read_features(model: Any, tokenizer: Any, sae_or_saes: SAE | Sequence[SAE] | Mapping[str, SAE],
                  text: str | Sequence[int] | torch.Tensor, *, top_k: int = 5,
                  include_special: bool = False) -> FeatureReading:
    """Feature activations of every SAE on every token of ``text`` (BOS prepended).

    ``text`` may also be token ids (a list or a 1-D / [1, seq] tensor), used as given: no BOS
    is added to ids.

    Args:
        model, tokenizer: as from :func:`llamascope_sdk.loading.models.load_model`.
        sae_or_saes: one SAE, a list, or a name -> SAE dict (names key the result).
        text: the text to read, or its token ids.
        top_k: how many features to list per token.
        include_special: also read BOS/EOS/pad positions (zero by default).

    Returns:
        A :class:`FeatureReading`. Transcoders are read at their input (normalised resid_mid).

    Example:
        >>> r = read_features(model, tok, sae, "The cat sat")
        >>> r.top[sae.name][1]  # [(feature, activation), ...] of the first real token
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if isinstance(text, str):
        ids = tokenize(tokenizer, text)
    else:
        ids = torch.as_tensor(text, dtype=torch.long).reshape(1, -1)
    check_fits_window(model, ids.shape[1])
    ids = ids.to(model_device(model))
    with attach(model, sae_or_saes, include_special=include_special,
                special_ids=special_ids(tokenizer), capture=("features",)) as h, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    acts = {n: f[0] for n, f in h.features.items()}
    top: dict[str, list[list[tuple[int, float]]]] = {}
    for name, a in acts.items():
        k = min(top_k, a.shape[-1])
        vals, idx = a.float().topk(k, dim=-1)
        top[name] = [[(int(i), float(v)) for i, v in zip(ri, rv, strict=True) if v > 0]
                     for ri, rv in zip(idx.tolist(), vals.tolist(), strict=True)]
    id_list = ids[0].tolist()
    return FeatureReading(tokens=[tokenizer.decode([i]) for i in id_list], token_ids=id_list,
                          acts=acts, top=top)


def measure_feature_stats(model: Any, tokenizer: Any, sae: SAE, texts: str | Iterable[str], *,
                          max_tokens: int | None = None,
                          save_to: str | Path | None = None) -> FeatureStats:
    """Measure each feature's typical activation on ``texts`` and set it as ``sae.stats``.

    Every text is run on its own (BOS prepended); BOS/EOS/pad positions are excluded. The
    ``typical`` value of a feature is the mean of its non-zero activations over the N counted
    tokens, ``mean`` its mean over all N tokens (see :class:`FeatureStats`).

    Args:
        texts: one text or several; ``max_tokens`` stops after about that many counted tokens.
        save_to: a file or a folder (e.g. the SAE's release folder) to write
            ``feature_stats.safetensors`` to.

    Returns:
        The :class:`FeatureStats`, also set as ``sae.stats`` so that ``Steer(relative=True)``
        and ``Ablate(mode="mean")`` on this SAE use it.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    total = torch.zeros(sae.d_sae, dtype=torch.float64)
    fired = torch.zeros(sae.d_sae, dtype=torch.float64)
    n = 0
    with attach(model, {"sae": sae}, special_ids=special_ids(tokenizer), capture=("features",)) as h:
        for text in texts:
            ids = tokenize(tokenizer, text)
            check_fits_window(model, ids.shape[1], what="a text")
            ids = ids.to(model_device(model))
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            mask = h.mask
            assert mask is not None  # the model's pre-hook records it on every forward
            keep = mask.reshape(-1).cpu()
            f = h.features["sae"].reshape(-1, sae.d_sae).cpu().double()[keep]
            total += f.sum(0)
            fired += (f > 0).sum(0)
            n += int(keep.sum())
            if max_tokens is not None and n >= max_tokens:
                break
    if n == 0:
        raise ValueError("measure_feature_stats: the texts hold no non-special tokens")
    stats = FeatureStats.from_sums(total, fired, n)
    sae.stats = stats
    if save_to is not None:
        stats.save(save_to)
    return stats


def encode_report(reading: FeatureReading, sae: SAE) -> dict[str, Any]:
    """What ``llamascope encode --json`` prints for one SAE: the reading, the features that are
    dense (fire on more than :data:`~llamascope_sdk.core.metrics.DENSE_FREQUENCY` of the tokens,
    from ``sae.stats``) and the known labels."""

    out = reading.to_dict()
    freq = sae.stats.frequency if sae.stats is not None else None
    if freq is not None:
        out["dense"] = sorted({f for rows in reading.top.values() for row in rows
                               for f, _ in row if float(freq[f]) > DENSE_FREQUENCY})
    out["labels"] = {str(f): sae.labels[f] for rows in reading.top.values() for row in rows
                     for f, _ in row if f in sae.labels}
    return out
