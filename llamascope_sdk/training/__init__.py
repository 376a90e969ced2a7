"""Reproduce the Llama Scope SAEs: recipes, activation generation, Top-K training, export.

Never imported by ``import llamascope_sdk``; import it explicitly (needs the ``train`` extra:
datasets, tqdm, pyyaml).

Example:
    >>> from llamascope_sdk.training import recipe_for, train
    >>> cfg = recipe_for("L15R-8x").with_overrides(["device=cuda"])
    >>> folders = train([cfg])
"""

from __future__ import annotations

from llamascope_sdk.training.config import TrainConfig
from llamascope_sdk.training.loop import train
from llamascope_sdk.training.recipes import all_recipes, paper_overrides, recipe_for

__all__ = ["TrainConfig", "all_recipes", "paper_overrides", "recipe_for", "train"]
