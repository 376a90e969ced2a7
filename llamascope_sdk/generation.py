"""Generating with and without interventions: the baseline and the steered text side by side."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .hooks import attach
from .interventions import Intervention
from .models import model_device, special_ids, tokenize


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
    ids = tokenize(tokenizer, prompt).to(model_device(model))
    base = _generate(model, tokenizer, ids, max_new_tokens, seed, do_sample)
    with attach(model, interventions=interventions, special_ids=special_ids(tokenizer), capture=False):
        steered = _generate(model, tokenizer, ids, max_new_tokens, seed, do_sample)
    return Comparison(prompt=prompt, baseline=tokenizer.decode(base, skip_special_tokens=True),
                      steered=tokenizer.decode(steered, skip_special_tokens=True),
                      baseline_ids=base, steered_ids=steered)


