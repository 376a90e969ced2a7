"""Errors of the training package (all :class:`llamascope_sdk.base.errors.LlamascopeError`).

``training/run.py`` prints any of these as one ``error:`` line plus its ``hint``.
"""

from __future__ import annotations

from llamascope_sdk.base.errors import LlamascopeError


class TrainingError(LlamascopeError):
    """Base class of the training package's deliberate errors."""


class TrainConfigError(TrainingError, ValueError):
    """A recipe value that cannot be trained with (non-finite, out of range, too large for the
    model), or a recipe file that cannot be read."""


class CheckpointError(TrainingError, RuntimeError):
    """Checkpoints exist but none can be resumed, or ``latest.json`` is invalid."""


class NonFiniteError(TrainingError, FloatingPointError):
    """The loss or the parameters became NaN/inf: the run stops before writing anything."""
