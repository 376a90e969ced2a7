"""Whether an SAE fits a model: :func:`check_compatible` (the one check, done once per model
and SAE pair) and :func:`named_saes` (several SAEs entering one run, each with its name)."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

from torch import nn

from llamascope_sdk.base.errors import IncompatibleModelError
from llamascope_sdk.core.sites import Site, hidden_size, module_for, parse_hook_point
from llamascope_sdk.loading.registry import BASE_MODEL, D_MODEL
from llamascope_sdk.loading.sae import SAE

#: SAE -> (the model it was checked against, its sites): a command that checks early (the
#: CLI, before reading a corpus) and then calls a library function that checks at its entry
#: runs the check once.
_CHECKED: weakref.WeakKeyDictionary[SAE, tuple[weakref.ref[nn.Module], tuple[Site, Site]]] = (
    weakref.WeakKeyDictionary())


def check_compatible(model: nn.Module, sae: SAE, name: str | None = None) -> tuple[Site, Site]:
    """Check that ``sae`` fits ``model``; return its (input, output) sites.

    Raises:
        IncompatibleModelError: hidden sizes differ, or the SAE's layer is beyond the model.
        HookpointNotFoundError: the model's layers lack the module a site needs.
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"expected an SAE, got {type(sae).__name__}")
    done = _CHECKED.get(sae)
    if done is not None and done[0]() is model:
        return done[1]
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
    _CHECKED[sae] = (weakref.ref(model), (site_in, site_out))
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
