"""High-level reading and steering: what the CLI and the eval code call.

``read_features`` runs text through the model with SAEs attached and returns per-token
activations and top features; ``compare_generations`` generates a baseline and a steered
continuation side by side; ``feature_stats`` measures the typical activation that relative
steering strengths are expressed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .hooks import attach
from .interventions import FeatureStats, Intervention, register_stats
from .models import special_ids, tokenize
from .sae import SAE


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


@dataclass
class Comparison:
    """A baseline and a steered continuation of one prompt (new tokens only)."""

    prompt: str
    baseline: str
    steered: str
    baseline_ids: list[int]
    steered_ids: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "baseline": self.baseline, "steered": self.steered,
                "baseline_ids": self.baseline_ids, "steered_ids": self.steered_ids}


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def read_features(model: Any, tokenizer: Any, sae_or_saes: SAE | Sequence[SAE] | Mapping[str, SAE],
                  text: str | Sequence[int] | torch.Tensor, *, top_k: int = 5,
                  include_special: bool = False) -> FeatureReading:
    """Feature activations of every SAE on every token of ``text`` (BOS prepended).

    ``text`` may also be token ids (a list or a 1-D / [1, seq] tensor), used as given: no BOS
    is added to ids.

    Args:
        model, tokenizer: as from :func:`llamascope_sdk.models.load_model`.
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
    ids = ids.to(_device(model))
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


def _generate(model: Any, tokenizer: Any, ids: torch.Tensor, max_new_tokens: int, seed: int | None,
              do_sample: bool) -> list[int]:
    if seed is not None:
        torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=do_sample, pad_token_id=pad)
    return out[0, ids.shape[1]:].tolist()


def compare_generations(model: Any, tokenizer: Any, prompt: str,
                        interventions: Intervention | Iterable[Intervention], *,
                        max_new_tokens: int = 40, seed: int | None = None,
                        do_sample: bool = False) -> Comparison:
    """Generate from ``prompt`` without and with ``interventions`` (KV cache, same settings).

    Args:
        prompt: the prompt text (BOS prepended).
        interventions: Steer/Clamp/Scale/Ablate objects; applied at every step of generation
            at the positions each names.
        max_new_tokens, do_sample: as in ``model.generate`` (greedy by default).
        seed: reseeds torch before each of the two generations (for sampling).

    Returns:
        A :class:`Comparison` of the two continuations (new tokens only).
    """
    ids = tokenize(tokenizer, prompt).to(_device(model))
    base = _generate(model, tokenizer, ids, max_new_tokens, seed, do_sample)
    with attach(model, interventions=interventions, special_ids=special_ids(tokenizer), capture=False):
        steered = _generate(model, tokenizer, ids, max_new_tokens, seed, do_sample)
    return Comparison(prompt=prompt, baseline=tokenizer.decode(base, skip_special_tokens=True),
                      steered=tokenizer.decode(steered, skip_special_tokens=True),
                      baseline_ids=base, steered_ids=steered)


def feature_stats(model: Any, tokenizer: Any, sae: SAE, texts: str | Iterable[str], *,
                  max_tokens: int | None = None, save_to: str | Path | None = None) -> FeatureStats:
    """Measure each feature's typical activation on ``texts`` and register it for ``sae``.

    Every text is run on its own (BOS prepended); BOS/EOS/pad positions are excluded. The
    ``typical`` value of a feature is the mean of its non-zero activations over the N counted
    tokens, ``mean`` its mean over all N tokens (see :class:`FeatureStats`).

    Args:
        texts: one text or several; ``max_tokens`` stops after about that many counted tokens.
        save_to: a file or a folder (e.g. the SAE's release folder) to write
            ``feature_stats.safetensors`` to.

    Returns:
        The :class:`FeatureStats`, also registered so that ``Steer(relative=True)`` and
        ``Ablate(mode="mean")`` on this SAE object use it.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    total = torch.zeros(sae.d_sae, dtype=torch.float64)
    fired = torch.zeros(sae.d_sae, dtype=torch.float64)
    n = 0
    with attach(model, {"sae": sae}, special_ids=special_ids(tokenizer), capture=("features",)) as h:
        for text in texts:
            ids = tokenize(tokenizer, text).to(_device(model))
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            keep = h.mask.reshape(-1).cpu()
            f = h.features["sae"].reshape(-1, sae.d_sae).cpu().double()[keep]
            total += f.sum(0)
            fired += (f > 0).sum(0)
            n += int(keep.sum())
            if max_tokens is not None and n >= max_tokens:
                break
    if n == 0:
        raise ValueError("feature_stats: the texts hold no non-special tokens")
    stats = FeatureStats(mean=(total / n).float(),
                         typical=torch.where(fired > 0, total / fired.clamp(min=1), 0).float(),
                         frequency=(fired / n).float(), n_tokens=n)
    register_stats(sae, stats)
    if save_to is not None:
        stats.save(save_to)
    return stats
