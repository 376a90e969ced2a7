"""Writing a release folder (hyperparams.json, lm_config.json, checkpoints/final.safetensors and
the optional card, statistics, labels and recipe) whole, in one atomic step: the release layout
as one of the formats the SDK writes. Its file names and readers live in
:mod:`llamascope_sdk.loading.release`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llamascope_sdk.base.atomic import atomic_save_safetensors, atomic_write_text
from llamascope_sdk.base.errors import CorruptCheckpointError
from llamascope_sdk.core.feature_stats import LABELS_FILE, STATS_FILE, FeatureStats, write_labels
from llamascope_sdk.core.hyperparams import Hyperparams
from llamascope_sdk.loading.formats._build import write_sae_folder
from llamascope_sdk.loading.release import (
    CARD,
    CHECKPOINT,
    FORMAT_VERSION,
    HYPERPARAMS,
    LM_CONFIG,
    PER_FEATURE_THRESHOLD,
    RECIPE,
    expected_shapes,
)


def write_release(folder: str | Path, hp: Hyperparams, tensors: dict[str, torch.Tensor],
                  lm_config: dict[str, Any], card: str | None = None, *,
                  stats: FeatureStats | None = None, labels: dict[int, str] | None = None,
                  recipe: str | None = None) -> Path:
    """Write a complete release folder whole, in one atomic step (see the module docstring).

    Args:
        folder: a new or empty folder, or a release/SAE folder this SDK wrote (replaced whole).
        hp, tensors, lm_config: hyperparams.json, checkpoints/final.safetensors, lm_config.json.
        card, stats, labels, recipe: README.md, feature_stats.safetensors,
            feature_labels.json, recipe.yaml; a file whose value is None is not written (and
            gone if the old folder had it).

    Raises:
        CorruptCheckpointError: a tensor of the wrong name or shape (before anything is written).
        FolderNotOwnedError: ``folder`` holds files the SDK did not write.
    """

    folder = Path(folder)
    want = expected_shapes(hp)
    if PER_FEATURE_THRESHOLD in tensors:
        want[PER_FEATURE_THRESHOLD] = (hp.d_sae,)
    for name, shape in want.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = None if name not in tensors else list(tensors[name].shape)
            raise CorruptCheckpointError(f"cannot save: tensor '{name}' has shape {got}, expected {list(shape)}")

    def write(tmp: Path) -> None:
        atomic_save_safetensors({k: tensors[k] for k in want}, tmp / CHECKPOINT,
                                metadata={"format": "pt", "version": FORMAT_VERSION})
        atomic_write_text(tmp / HYPERPARAMS, json.dumps(hp.to_json_dict(), indent=4) + "\n")
        atomic_write_text(tmp / LM_CONFIG, json.dumps(lm_config, indent=4) + "\n")
        if card is not None:
            atomic_write_text(tmp / CARD, card)
        if stats is not None:
            stats.save(tmp / STATS_FILE)
        if labels:
            write_labels(tmp / LABELS_FILE, labels)
        if recipe is not None:
            atomic_write_text(tmp / RECIPE, recipe)

    return write_sae_folder(folder, write)
