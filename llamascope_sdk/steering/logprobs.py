"""Token log-probabilities: of the token that came, and the top-N alternatives, per position.

The numbers are ``log_softmax`` of the model's logits in fp32, at the model's own temperature
(1.0): a request's ``temperature`` and ``top_p`` change which token is drawn, not the
log-probabilities reported for it (as OpenAI's API and vLLM's default report them).

For a prompt (``echo``), the logits at every prompt position are needed. The generator's
forward keeps only the last position's logits (``logits_to_keep=1``: the whole [B, T, V] logits
of a batch of long prompts would be gigabytes), so :class:`FinalHidden` keeps the final hidden
states (the output of the model's last norm, [B, T, D]) and :func:`prompt_logprobs` applies the
model's own output layer to one row's prompt positions at a time: the logits a plain forward
computes, V x T floats for one row at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llamascope_sdk.core.hooks import module_hooks

#: top-N alternatives one position may ask for (OpenAI allows 5 on completions, 20 in chat)
MAX_TOP = 20
#: positions scored at a time by :func:`score` (see there)
SCORE_CHUNK = 64


@dataclass
class Logprobs:
    """Log-probabilities at consecutive positions.

    ``token[i]`` is the log-probability of the token at position ``i`` given the tokens before
    it (None for a prompt's first token: nothing predicts it); ``top[i]`` the ``n`` most likely
    tokens there as ``(token id, log-probability)``, most likely first (empty at the first
    prompt token).
    """

    token: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)

    def extend(self, other: Logprobs) -> None:
        self.token += other.token
        self.top += other.top


def score(logits_TV: torch.Tensor, next_T: torch.Tensor, top_n: int) -> Logprobs:
    """Log-probabilities of ``next_T[t]`` under ``logits_TV[t]``, and the ``top_n`` best at each t.

    The chosen token's value and the top values come from one ``log_softmax`` tensor, so a
    token that is the most likely one has exactly the value listed first in ``top`` (lm-eval's
    ``is_greedy`` compares them with ``==``).
    """
    chosen: list[float | None] = []
    top: list[list[tuple[int, float]]] = []
    next_T = next_T.to(logits_TV.device)
    # SCORE_CHUNK positions at a time, so that gather and topk read a chunk's log_softmax
    # (SCORE_CHUNK x V floats, 12 MB for a 49k vocabulary) while it is still in the CPU's
    # cache, not a 100 MB tensor written whole and read back: the 511 positions of a
    # 512-token prompt took 108 ms instead of 147 (2-core CPU, one thread; the forward that
    # computed their logits takes ~2 s). Positions are independent: the values are the same
    # bits (checked in tests/test_logprobs.py).
    for lo in range(0, logits_TV.shape[0], SCORE_CHUNK):
        lp_TV = torch.log_softmax(logits_TV[lo:lo + SCORE_CHUNK].float(), dim=-1)
        chosen += lp_TV.gather(-1, next_T[lo:lo + SCORE_CHUNK, None])[:, 0].tolist()
        if top_n > 0:
            vals_TN, idx_TN = lp_TV.topk(top_n, dim=-1)
            top += [list(zip(i, v, strict=True))
                    for i, v in zip(idx_TN.tolist(), vals_TN.tolist(), strict=True)]
        else:
            top += [[] for _ in range(lp_TV.shape[0])]
    return Logprobs(token=chosen, top=top)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm whose output the language-model head reads (``model.model.norm`` for Llama)."""
    get = getattr(model, "get_decoder", None)
    base = get() if callable(get) else getattr(model, "model", None)
    norm = getattr(base, "norm", None)
    if not isinstance(norm, nn.Module):
        raise TypeError(f"{type(model).__name__}: no final norm found (expected model.model.norm "
                        "of a Llama-family causal LM)")
    return norm


class FinalHidden:
    """Keeps the final hidden states [B, T, D] of the forwards run inside the ``with`` block
    (a forward hook on :func:`final_norm`, removed on exit); ``active=False``: does nothing."""

    def __init__(self, model: nn.Module, *, active: bool = True) -> None:
        self.model, self.active = model, active
        self.hidden_BTD: torch.Tensor | None = None
        self._stack = ExitStack()

    def __enter__(self) -> FinalHidden:
        def keep(_mod: nn.Module, _inp: Any, out: Any) -> None:
            self.hidden_BTD = out[0] if isinstance(out, tuple) else out

        if self.active:
            self._stack.enter_context(module_hooks([(final_norm(self.model), "post", keep)]))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def prompt_logprobs(model: nn.Module, hidden_TD: torch.Tensor, ids: Sequence[int],
                    top_n: int) -> Logprobs:
    """Log-probabilities of a prompt's tokens from its final hidden states (``hidden_TD``: the
    row's prompt positions, no padding): None for the first, then ``log p(ids[t] | ids[:t])``."""
    head = getattr(model, "get_output_embeddings")()  # noqa: B009  (nn.Module's typing hides it)
    if len(ids) < 2:
        return Logprobs(token=[None], top=[[]])
    with torch.no_grad():
        logits_TV = head(hidden_TD[:-1])
    out = score(logits_TV, torch.tensor(list(ids[1:]), dtype=torch.long), top_n)
    return Logprobs(token=[None, *out.token], top=[[], *out.top])


__all__ = ["MAX_TOP", "FinalHidden", "Logprobs", "final_norm", "prompt_logprobs", "score"]
