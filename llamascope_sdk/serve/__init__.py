"""``llamascope serve``: the steered model behind an OpenAI-compatible HTTP API.

One noun per module: :mod:`.payloads` (request bodies, checked), :mod:`.steering` (the
``steering`` field to row edits), :mod:`.scheduler` (continuous batching on one thread),
:mod:`.app` (the endpoints), :mod:`.encoding` (``/v1/encode``), :mod:`.runner` (binding,
graceful shutdown), :mod:`.errors` (HTTP errors). Needs the ``serve`` extra (fastapi, uvicorn).
"""

from __future__ import annotations

from llamascope_sdk.serve.app import ServeConfig, create_app
from llamascope_sdk.serve.payloads import Limits
from llamascope_sdk.serve.runner import run

__all__ = ["Limits", "ServeConfig", "create_app", "run"]
