"""Capturing activations at sites: the one piece of code that runs a model over a batch of
token ids and returns what it saw at a set of hook points.

Mining (:mod:`llamascope_sdk.mining.mine`), evaluation's clean pass
(:mod:`llamascope_sdk.evaluation.evaluate`) and training's activation generation
(:mod:`llamascope_sdk.training.activations`) all call :func:`capture`; hooks are placed through
:func:`~llamascope_sdk.core.hooks.hooked` and removed on exit, and padding is masked with the
attention mask. :func:`keep_mask` is the one rule for which positions count: real tokens that
are not special (BOS/EOS/pad).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from llamascope_sdk.core.hooks import capture_into, hooked
from llamascope_sdk.core.sites import Site
from llamascope_sdk.loading.models import model_device


def valid_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] bool: True on the first ``lengths[b]`` positions of row b (the rest is pad)."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def keep_mask(ids: torch.Tensor, valid: torch.Tensor, specials: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: positions that count, i.e. valid and not a special token id."""
    return valid & ~torch.isin(ids, specials.to(ids.device))


@torch.no_grad()
def capture(model: nn.Module, sites: Iterable[Site], ids: torch.Tensor, valid: torch.Tensor,
            *, stop_after_last: bool = True) -> tuple[dict[Site, torch.Tensor], Any]:
    """One forward of ``model`` over ``ids`` [B, T] (``valid`` [B, T] marks real tokens) that
    records the activation [B, T, D] at every site in ``sites``.

    Returns ``(activations by site, model output)``; with ``stop_after_last`` the forward ends
    after the last site (layers after it never run) and the output is ``None``.
    """
    acts: dict[Site, torch.Tensor] = {}
    hooks = {site: capture_into(acts, site) for site in dict.fromkeys(sites)}
    dev = model_device(model)
    out = None
    with hooked(model, hooks, stop_after_last=stop_after_last):
        out = model(input_ids=ids.to(dev), attention_mask=valid.long().to(dev), use_cache=False)
    return acts, out


__all__ = ["capture", "keep_mask", "valid_mask"]
