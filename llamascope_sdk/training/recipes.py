"""Recipes for the 256 released checkpoints, generated from the registry (spec section 4)."""

from __future__ import annotations

import math
from typing import Any

from llamascope_sdk.loading.registry import D_MODEL, list_saes, resolve
from llamascope_sdk.training.config import TrainConfig

#: 800M tokens for 8x, 1.6B for 32x (the released k_warmup_steps are 10% of these steps).
TOKENS = {8: 800_000_000, 32: 1_600_000_000}


def recipe_for(name: str) -> TrainConfig:
    """The released recipe of one checkpoint, e.g. ``recipe_for("L15R-8x")``.

    Raises:
        UnknownSaeError: not a Llama Scope name.
    """
    ref = resolve(name)
    tc = ref.position == "TC"
    return TrainConfig(
        name=ref.name, hook_point_in=ref.hook_point_in, hook_point_out=ref.hook_point_out,
        d_model=D_MODEL, expansion_factor=ref.expansion, top_k=50,
        total_tokens=TOKENS[ref.expansion], lr=8e-4,
        init_encoder_norm=0.5 if tc else None)


def all_recipes() -> list[TrainConfig]:
    """Recipes of all 256 checkpoints, in registry order."""
    return [recipe_for(r.name) for r in list_saes()]


def paper_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """Fields whose paper value differs from the released script (spec 4, 7.2)."""
    return {"variant": "paper", "betas": (0.9, 0.999), "lr_warmup_steps": 10_000,
            "lr_end_ratio": 0.0, "clip_grad_norm": None, "k_init_ratio": 1.0,
            "init_decoder_norm": math.sqrt(2.0 / cfg.expansion_factor)}
