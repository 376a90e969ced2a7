"""Generating with and without interventions: the baseline and the steered text side by side.

``compare_generations`` runs ``model.generate`` twice with the same settings, once clean and
once with the interventions attached; with ``chat=True`` the prompt is a user message formatted
by the tokenizer's chat template, and what is compared are the assistant's replies.
``describe`` states an intervention's strength in the units a reader can judge.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from llamascope_sdk.base.errors import InputError
from llamascope_sdk.corpus import pad_id
from llamascope_sdk.loading.models import check_fits_window, model_device, special_ids, tokenize
from llamascope_sdk.steering.attachment import attach
from llamascope_sdk.steering.interventions import Ablate, Clamp, Intervention, Scale, Steer


@dataclass
class Comparison:
    """A baseline and a steered continuation of one prompt (new tokens only)."""

    prompt: str
    baseline: str
    steered: str
    baseline_ids: list[int]
    steered_ids: list[int]
    chat: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chat": self.chat, "baseline": self.baseline,
                "steered": self.steered, "baseline_ids": self.baseline_ids,
                "steered_ids": self.steered_ids}


def prompt_ids(tokenizer: Any, prompt: str, *, chat: bool = False) -> torch.Tensor:
    """Token ids [1, T] of ``prompt``: BOS + text, or with ``chat`` the tokenizer's chat
    template applied to one user message, ending with the assistant's turn opening.

    Raises:
        InputError: ``chat`` with a tokenizer that has no chat template.
    """
    if not chat:
        return tokenize(tokenizer, prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("--chat: this tokenizer has no chat template (a base model?)",
                         hint="drop --chat, or use the Instruct model")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in some versions
        ids = ids["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)


def _generate(model: Any, tokenizer: Any, ids: torch.Tensor, max_new_tokens: int, seed: int | None,
              do_sample: bool) -> list[int]:
    if seed is not None:
        torch.manual_seed(seed)
    pad = pad_id(tokenizer)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=do_sample, pad_token_id=pad)
    return out[0, ids.shape[1]:].tolist()


def compare_generations(model: Any, tokenizer: Any, prompt: str,
                        interventions: Intervention | Iterable[Intervention], *,
                        max_new_tokens: int = 40, seed: int | None = None,
                        do_sample: bool = False, chat: bool = False) -> Comparison:
    """Generate from ``prompt`` without and with ``interventions`` (KV cache, same settings).

    Args:
        prompt: the prompt text (BOS prepended), or with ``chat`` the user's message.
        interventions: Steer/Clamp/Scale/Ablate objects; applied at every step of generation
            at the positions each names. For a chat, build them with
            ``positions="generated"`` to steer only the assistant's reply.
        max_new_tokens, do_sample: as in ``model.generate`` (greedy by default).
        seed: reseeds torch before each of the two generations (for sampling).
        chat: format ``prompt`` with the tokenizer's chat template (one user turn, then the
            assistant's turn); the replies are the assistant's tokens.

    Returns:
        A :class:`Comparison` of the two continuations (new tokens only).

    Raises:
        InputError: an empty prompt, or prompt + ``max_new_tokens`` beyond the model's window.
    """
    if not prompt:
        raise InputError("the prompt is empty", hint="give some text to continue")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ids = prompt_ids(tokenizer, prompt, chat=chat).to(model_device(model))
    check_fits_window(model, ids.shape[1], max_new_tokens)
    base = _generate(model, tokenizer, ids, max_new_tokens, seed, do_sample)
    with attach(model, interventions=interventions, special_ids=special_ids(tokenizer), capture=False):
        steered = _generate(model, tokenizer, ids, max_new_tokens, seed, do_sample)
    return Comparison(prompt=prompt, baseline=tokenizer.decode(base, skip_special_tokens=True),
                      steered=tokenizer.decode(steered, skip_special_tokens=True),
                      baseline_ids=base, steered_ids=steered, chat=chat)


def describe(iv: Intervention) -> str:
    """One line that states what ``iv`` does in units a reader can judge.

    A raw steering strength is the length of the added vector; it is also given as a fraction
    of the mean activation norm at the SAE's output site (``dataset_average_activation_norm``
    of hyperparams.json). A relative one is in multiples of each feature's typical activation
    (``sae.stats``). Known feature labels (``sae.labels``) are appended.
    """
    sae = iv.sae
    feats = [int(i) for i in iv.idx]
    names = feature_names(feats, sae.labels)
    where = f"positions={iv.positions}" if isinstance(iv.positions, str) else "chosen positions"
    if isinstance(iv, Steer):
        norms = sae.hyperparams.dataset_average_activation_norm
        return describe_steer(names, [float(a) for a in iv.coefficients()],
                              torch.as_tensor(iv.strength).reshape(-1).tolist() if iv.relative
                              else None, norms.out if norms is not None else None, where)
    if isinstance(iv, Clamp):
        return f"clamp feature {names} to {iv.value}, {where}"
    if isinstance(iv, Scale):
        return f"scale feature {names} by {iv.factor}, {where}"
    if isinstance(iv, Ablate):
        return f"ablate feature {names} ({iv.mode}), {where}"
    return f"{type(iv).__name__} on feature {names}, {where}"


def feature_names(features: list[int], labels: dict[int, str]) -> str:
    """``"4154 'Shakespeare ...', 12"``: feature indices with their labels where known."""
    return ", ".join(f"{f} '{labels[f]}'" if f in labels else str(f) for f in features)


def describe_steer(names: str, alpha: list[float], relative: list[float] | None,
                   site_norm: float | None, where: str) -> str:
    """The steer line of :func:`describe` from its parts: ``alpha`` the vector lengths in model
    units, ``relative`` the strengths in typical activations when they were relative."""
    size = "/".join(f"{a:+.4g}" for a in dict.fromkeys(alpha))
    unit = (f"{'/'.join(f'{float(s):g}' for s in relative)} x typical activation = "
            if relative is not None else "")
    frac = (f" ({'/'.join(f'{abs(a) / site_norm:.2f}' for a in dict.fromkeys(alpha))} x the "
            f"site's mean norm {site_norm:.4g})" if site_norm else "")
    return (f"steer feature {names}: {unit}a vector of length {size} along its unit decoder "
            f"direction{frac}, {where}")
