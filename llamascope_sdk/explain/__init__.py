"""Automatic descriptions of SAE features: explain with any OpenAI-compatible chat model,
score with delphi's detection and fuzzing, and describe outputs without an LLM.

Modules: ``examples`` (which contexts the explainer and the scorers see), ``prompts`` (the
versioned prompts and their parsers), ``scoring`` (detection, fuzzing, balanced accuracy),
``cost`` (requests and tokens before sending), ``runner`` (the resumable run), ``records``
(the files beside the store), ``llm_free`` (VocabProj and TokenChange).
"""

from __future__ import annotations

from llamascope_sdk.explain.runner import RunResult, Settings, explain_features, plan_run
from llamascope_sdk.store.explanations import descriptions, feature_explanations

__all__ = ["RunResult", "Settings", "descriptions", "explain_features", "feature_explanations",
           "plan_run"]
