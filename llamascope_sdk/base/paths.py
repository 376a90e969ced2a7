"""Where the SDK keeps its own files: converted models, verification records.

Hugging Face downloads stay in the Hugging Face cache (``HF_HUB_CACHE``); this is only what
the SDK derives from them. ``$LLAMASCOPE_CACHE`` moves it (read at call time, so tests and
jobs can point it elsewhere).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$LLAMASCOPE_CACHE, or ~/.cache/llamascope."""
    env = os.environ.get("LLAMASCOPE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llamascope"


def models_dir() -> Path:
    """Converted copies of models (the dequantised SmolLM2 GGUF)."""
    return cache_root() / "models"


def verified_dir() -> Path:
    """Records of checkpoints whose sha256 was checked, so later loads skip the hash."""
    return cache_root() / "verified"

#: The installed package folder (llamascope_sdk/), whose assets/ ship in the wheel.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
