"""The one hook mechanism of the SDK: :func:`module_hooks` and, on it, :func:`hooked`.

:func:`module_hooks` is the only place where the SDK registers hooks on a model's modules and
removes them (on exit, on an exception, on KeyboardInterrupt, and when registering a later
hook fails). :func:`hooked`, built on it, places a capture or replace function at each
:class:`~llamascope_sdk.core.sites.Site` (the module :mod:`llamascope_sdk.core.sites` maps it
to) and can cut the forward short after the last site it needs.
:func:`~llamascope_sdk.steering.attachment.attach`, evaluation, feature mining and training's
activation generation are built on :func:`hooked`; the trace's frozen forward and the final
hidden states of served requests use :func:`module_hooks` directly (their modules are not
sites). It depends only on :mod:`llamascope_sdk.core.sites` (whether an SAE fits a model is
:mod:`llamascope_sdk.loading.compat`'s job).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from llamascope_sdk.core.sites import Site, first, module_for, read_activation, replace_first

#: A function placed at a site. It gets the activation there ([B, T, D]); at an output site
#: it may return a tensor of the same shape that replaces the activation downstream, or None
#: to leave it. At the TC input site (read from a module's input) its return value is ignored.
SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]
#: Called before every forward of the decoder stack with that forward's (args, kwargs).
ForwardFn = Callable[[tuple[Any, ...], dict[str, Any]], None]

#: One module hook: (module, kind, function). Kinds: "pre" (``register_forward_pre_hook``:
#: ``fn(module, args)``), "pre_kwargs" (the same with kwargs: ``fn(module, args, kwargs)``)
#: and "post" (``register_forward_hook``: ``fn(module, args, output)``).
ModuleHook = tuple[nn.Module, str, Callable[..., Any]]


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
    specs: list[ModuleHook] = []
    if before_forward is not None:
        specs.append((getattr(model, "model", model), "pre_kwargs",
                      lambda _m, args, kwargs: before_forward(args, kwargs)))
    for site, fns in hooks.items():
        chain = [fns] if callable(fns) else list(fns)
        specs.append((module_for(model, site), "pre", _input_hook(site, chain))
                     if site.reads_input else
                     (module_for(model, site), "post", _output_hook(chain)))
    if stop_after_last and hooks:
        last = max(hooks, key=lambda s: s.order)
        # Registered after the site's own hook on that module, so it runs after it.
        specs.append((module_for(model, last), "pre" if last.reads_input else "post", _stop))
    try:
        with module_hooks(specs):
            yield
    except _StopForward:
        pass


@contextmanager
def module_hooks(specs: Iterable[ModuleHook]) -> Iterator[None]:
    """Register ``specs`` in order for the duration of a ``with`` block; every one is removed
    on exit, on an exception, and if registering a later one fails. For hooks that are not at
    a :class:`~llamascope_sdk.core.sites.Site` (the trace's freezes, the final norm's output);
    everything at a site goes through :func:`hooked`."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for module, kind, fn in specs:
            if kind == "post":
                handles.append(module.register_forward_hook(fn))
            elif kind in ("pre", "pre_kwargs"):
                handles.append(module.register_forward_pre_hook(
                    fn, with_kwargs=kind == "pre_kwargs"))
            else:
                raise ValueError(f"hook kind {kind!r}; allowed are pre, pre_kwargs, post")
        yield
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
