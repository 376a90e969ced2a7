"""llamascope-sdk: load, hook, steer, evaluate and train the Llama Scope SAEs and transcoders.

Importing the package is cheap: torch and transformers load only when a name that needs them
is first used.

Example:
    >>> from llamascope_sdk import SAE
    >>> sae = SAE.from_pretrained("L12M-128k")
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "SAE": "sae",
    "Hyperparams": "hyperparams",
    "SaeRef": "registry",
    "list_saes": "registry",
    "resolve": "registry",
    "load_model": "models",
    "attach": "hooks",
    "Intervention": "interventions",
    "LlamascopeError": "errors",
}

# Spelled out (not ``[*_EXPORTS]``) so that linters see the TYPE_CHECKING imports as exported.
__all__ = ["__version__", "SAE", "Hyperparams", "SaeRef", "list_saes", "resolve", "load_model",
           "attach", "Intervention", "LlamascopeError"]

if TYPE_CHECKING:
    from .errors import LlamascopeError
    from .hooks import attach
    from .hyperparams import Hyperparams
    from .interventions import Intervention
    from .models import load_model
    from .registry import SaeRef, list_saes, resolve
    from .sae import SAE


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llamascope_sdk' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
