"""The one hook mechanism of the SDK: :func:`hooked`.

:func:`hooked` is the only place where the SDK registers hooks on a model. It places a capture
or replace function at each :class:`~llamascope_sdk.sites.Site` (the module
:mod:`llamascope_sdk.sites` maps it to), can cut the forward short after the last site it
needs, and removes every hook on exit, on an exception and on KeyboardInterrupt.
:func:`~llamascope_sdk.attachment.attach`, evaluation, feature mining and training's activation
generation are all built on it. :func:`check_compatible` is the one check that an SAE fits a
model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import IncompatibleModelError
from .registry import BASE_MODEL, D_MODEL
from .sae import SAE
from .sites import (
    Site,
    first,
    hidden_size,
    module_for,
    parse_hook_point,
    read_activation,
    replace_first,
)

#: A function placed at a site. It gets the activation there ([B, T, D]); at an output site
#: it may return a tensor of the same shape that replaces the activation downstream, or None
#: to leave it. At the TC input site (read from a module's input) its return value is ignored.
SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]
#: Called before every forward of the decoder stack with that forward's (args, kwargs).
ForwardFn = Callable[[tuple[Any, ...], dict[str, Any]], None]

#: Order in which a decoder layer's hooked modules run.
_ORDER = {"attn_out": 0, "ln2_normalized": 1, "mlp_out": 2, "resid_post": 3}


class _StopForward(Exception):
    """Raised after the last needed site; swallowed by :func:`hooked` (early exit)."""


@contextmanager
def hooked(model: nn.Module, hooks: Mapping[Site, SiteFn | Sequence[SiteFn]], *,
           stop_after_last: bool = False, before_forward: ForwardFn | None = None) -> Iterator[None]:
    """Place ``hooks`` on ``model`` for the duration of a ``with`` block.

    Args:
        model: a Llama-family transformers model (``model.model.layers``).
        hooks: site -> function (or functions, run in order, each seeing the previous one's
            replacement). See :data:`SiteFn`.
        stop_after_last: end the forward right after the last site in ``hooks`` has run, so
            later layers cost nothing. The model call then returns nothing and the ``with``
            block ends there without an error: make the model call the block's last statement.
        before_forward: called at the start of every forward of the decoder stack.

    Example:
        >>> acts = {}
        >>> with hooked(model, {Site(3, "resid_post"): capture_into(acts, "L3R")},
        ...             stop_after_last=True):
        ...     model(ids)
        >>> acts["L3R"].shape  # [B, T, D]
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        if before_forward is not None:
            inner = getattr(model, "model", model)
            handles.append(inner.register_forward_pre_hook(
                lambda _m, args, kwargs: before_forward(args, kwargs), with_kwargs=True))
        for site, fns in hooks.items():
            chain = [fns] if callable(fns) else list(fns)
            module = module_for(model, site)
            if site.reads_input:
                handles.append(module.register_forward_pre_hook(_input_hook(site, chain)))
            else:
                handles.append(module.register_forward_hook(_output_hook(chain)))
        if stop_after_last and hooks:
            last = max(hooks, key=lambda s: (s.layer, _ORDER[s.kind]))
            module = module_for(model, last)
            # Registered after the site's own hook on that module, so it runs after it.
            if last.reads_input:
                handles.append(module.register_forward_pre_hook(_stop))
            else:
                handles.append(module.register_forward_hook(_stop))
        yield
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def _stop(*_args: Any) -> None:
    raise _StopForward


def _input_hook(site: Site, chain: list[SiteFn]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = read_activation(site, module, args)
        for fn in chain:
            fn(x)
    return hook


def _output_hook(chain: list[SiteFn]) -> Callable[..., Any]:
    def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        y = first(output)
        changed = False
        for fn in chain:
            new = fn(y)
            if new is not None:
                y, changed = new, True
        return replace_first(output, y) if changed else None
    return hook


def capture_into(store: dict[Any, torch.Tensor], key: Any) -> SiteFn:
    """A :data:`SiteFn` that stores the (detached) activation as ``store[key]``."""
    def fn(x: torch.Tensor) -> None:
        store[key] = x.detach()
    return fn


def replace_with(new_BTD: torch.Tensor) -> SiteFn:
    """A :data:`SiteFn` that replaces the activation by ``new_BTD`` (cast to its dtype)."""
    def fn(y: torch.Tensor) -> torch.Tensor:
        return new_BTD.to(device=y.device, dtype=y.dtype)
    return fn


def check_compatible(model: nn.Module, sae: SAE, name: str | None = None) -> tuple[Site, Site]:
    """Check that ``sae`` fits ``model``; return its (input, output) sites.

    Raises:
        IncompatibleModelError: hidden sizes differ, or the SAE's layer is beyond the model.
        HookpointNotFoundError: the model's layers lack the module a site needs.
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"expected an SAE, got {type(sae).__name__}")
    d = hidden_size(model)
    if sae.d_model != d:
        raise IncompatibleModelError(
            f"{name or sae.name}: SAE d_model={sae.d_model} does not match the model's "
            f"hidden_size={d} ({type(model).__name__}); Llama Scope SAEs need {BASE_MODEL} "
            f"(hidden_size {D_MODEL}), the demo SAE needs SmolLM2-135M (576)")
    site_in = parse_hook_point(sae.hyperparams.hook_point_in)
    site_out = parse_hook_point(sae.hyperparams.hook_point_out)
    module_for(model, site_in)
    module_for(model, site_out)
    return site_in, site_out


def named_saes(saes: SAE | Iterable[SAE] | Mapping[str, SAE]) -> dict[str, SAE]:
    """``{name: SAE}`` from one SAE, several (two SAEs that share a name get ``name#2``...) or a
    mapping. Each result is keyed by that name.

    Raises:
        ValueError: one SAE object given twice (it would be read twice for nothing).
    """
    if isinstance(saes, SAE):
        saes = [saes]
    items = list(saes.values()) if isinstance(saes, Mapping) else list(saes)
    seen: dict[int, str] = {}
    for i, sae in enumerate(items):
        if not isinstance(sae, SAE):
            raise TypeError(f"saes: expected SAE objects, got {type(sae).__name__} at position {i}")
        if id(sae) in seen:
            raise ValueError(f"saes: the SAE object {sae.name!r} is given twice; pass it once "
                             "(its features are keyed by its name)")
        seen[id(sae)] = sae.name
    if isinstance(saes, Mapping):
        return dict(saes)
    out: dict[str, SAE] = {}
    for sae in items:
        name, n = sae.name, 2
        while name in out:  # two SAEs with one name (e.g. synthetic ones): keep both
            name, n = f"{sae.name}#{n}", n + 1
        out[name] = sae
    return out
