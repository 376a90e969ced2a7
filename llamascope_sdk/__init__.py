"""llamascope-sdk: load, hook, steer, inspect, evaluate and train the Llama Scope SAEs and
transcoders.

The names below are what a researcher builds and calls; everything else lives in the module
named after it (see the package map in the README). Importing the package is cheap: torch and
transformers load only when a name that needs them is first used.

Example:
    >>> from llamascope_sdk import SAE, Steer, attach, load_model
    >>> sae = SAE.from_pretrained("L12M-128k")
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: public name -> the module that defines it
_EXPORTS = {
    "SAE": "sae",
    "Hyperparams": "hyperparams",
    "FeatureStats": "feature_stats",
    "list_saes": "registry",
    "load_model": "models",
    "tokenize": "models",
    "attach": "attachment",
    "hooked": "hooks",
    "Steer": "interventions",
    "Clamp": "interventions",
    "Scale": "interventions",
    "Ablate": "interventions",
    "read_features": "reading",
    "measure_feature_stats": "reading",
    "compare_generations": "generation",
    "generate_batch": "batch_generation",
    "BatchGenerator": "batch_generation",
    "SaePool": "pool",
    "evaluate": "evaluation",
    "LlamascopeError": "errors",
    "mine": "mining",
    "FeatureStore": "feature_store",
    "search_features": "search",
    "FeatureScores": "feature_scores",
    "score_features": "feature_scores",
    "DEMO_FEATURE": "demo",
    "run_script": "cli.app",
    "ChatClient": "endpoint",
    "explain_features": "explain",
    "check_corpus": "corpus",
}

# Spelled out (not ``[*_EXPORTS]``) so that linters see the TYPE_CHECKING imports as exported.
__all__ = ["__version__", "SAE", "Hyperparams", "FeatureStats", "list_saes", "load_model",
           "attach", "hooked", "Steer", "Clamp", "Scale", "Ablate", "read_features",
           "measure_feature_stats", "compare_generations", "generate_batch", "BatchGenerator",
           "SaePool", "evaluate", "LlamascopeError", "mine", "FeatureStore", "search_features", "tokenize",
           "DEMO_FEATURE", "run_script", "ChatClient", "explain_features", "FeatureScores", "score_features",
           "check_corpus"]

if TYPE_CHECKING:
    from .attachment import attach
    from .batch_generation import BatchGenerator, generate_batch
    from .cli.app import run_script
    from .corpus import check_corpus
    from .demo import DEMO_FEATURE
    from .endpoint import ChatClient
    from .errors import LlamascopeError
    from .evaluation import evaluate
    from .explain import explain_features
    from .feature_scores import FeatureScores, score_features
    from .feature_stats import FeatureStats
    from .feature_store import FeatureStore
    from .generation import compare_generations
    from .hooks import hooked
    from .hyperparams import Hyperparams
    from .interventions import Ablate, Clamp, Scale, Steer
    from .mining import mine
    from .models import load_model, tokenize
    from .pool import SaePool
    from .reading import measure_feature_stats, read_features
    from .registry import list_saes
    from .sae import SAE
    from .search import search_features


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llamascope_sdk' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
