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

__version__ = "0.3.0"

#: public name -> the module that defines it
_EXPORTS = {
    "SAE": "loading.sae",
    "Hyperparams": "core.hyperparams",
    "FeatureStats": "core.feature_stats",
    "list_saes": "loading.registry",
    "load_model": "loading.models",
    "tokenize": "loading.models",
    "attach": "steering.attachment",
    "hooked": "core.hooks",
    "Steer": "steering.interventions",
    "Clamp": "steering.interventions",
    "Scale": "steering.interventions",
    "Ablate": "steering.interventions",
    "read_features": "steering.reading",
    "measure_feature_stats": "steering.reading",
    "compare_generations": "steering.generation",
    "generate_batch": "steering.batch_generation",
    "BatchGenerator": "steering.batch_generation",
    "SaePool": "steering.pool",
    "evaluate": "evaluation.evaluate",
    "LlamascopeError": "base.errors",
    "mine": "mining.mine",
    "FeatureStore": "store.feature_store",
    "search_features": "store.search",
    "FeatureScores": "store.scores",
    "score_features": "store.scores",
    "DEMO_FEATURE": "loading.demo",
    "run_script": "cli.app",
    "ChatClient": "base.endpoint",
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
    from llamascope_sdk.base.endpoint import ChatClient
    from llamascope_sdk.base.errors import LlamascopeError
    from llamascope_sdk.cli.app import run_script
    from llamascope_sdk.core.feature_stats import FeatureStats
    from llamascope_sdk.core.hooks import hooked
    from llamascope_sdk.core.hyperparams import Hyperparams
    from llamascope_sdk.corpus import check_corpus
    from llamascope_sdk.evaluation.evaluate import evaluate
    from llamascope_sdk.explain import explain_features
    from llamascope_sdk.loading.demo import DEMO_FEATURE
    from llamascope_sdk.loading.models import load_model, tokenize
    from llamascope_sdk.loading.registry import list_saes
    from llamascope_sdk.loading.sae import SAE
    from llamascope_sdk.mining.mine import mine
    from llamascope_sdk.steering.attachment import attach
    from llamascope_sdk.steering.batch_generation import BatchGenerator, generate_batch
    from llamascope_sdk.steering.generation import compare_generations
    from llamascope_sdk.steering.interventions import Ablate, Clamp, Scale, Steer
    from llamascope_sdk.steering.pool import SaePool
    from llamascope_sdk.steering.reading import measure_feature_stats, read_features
    from llamascope_sdk.store.feature_store import FeatureStore
    from llamascope_sdk.store.scores import FeatureScores, score_features
    from llamascope_sdk.store.search import search_features


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llamascope_sdk' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
