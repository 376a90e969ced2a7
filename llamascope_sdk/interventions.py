"""Feature interventions: steer, clamp, scale and ablate SAE features inside a live model.

An intervention is plain data (which SAE, which features, what to do, where); ``attach``
in :mod:`llamascope_sdk.hooks` applies it. Semantics, for the clean activation y at the SAE's
``hook_point_out``, unit decoder rows d_i and feature activations f_i of the clean input x::

    Steer:  y <- y + alpha_i d_i                       (alpha = strength, or strength * typical_i)
    Clamp:  y <- y + (value    - f_i) d_i
    Scale:  y <- y + (factor*f_i - f_i) d_i
    Ablate: y <- y + (0 or mean_i - f_i) d_i

Clamp, scale and ablate change only the feature's own contribution, so the SAE's error term
(y - sae(x)) is kept: an intervention that sets f_i to its own value is an exact no-op. They need
f_i for the chosen features only, computed with ``sae.encode_features`` (n encoder rows, never
the full encoder) unless the SAE is also read or spliced, whose full encode is then reused.

Positions: ``"all"``, ``"prompt"`` (positions of the first forward of a sequence), ``"generated"``
(positions of tokens produced by ``generate``: index >= prompt length, so the first new token,
predicted from the last prompt position, is not yet affected), a ``slice`` of absolute positions,
or a list of ints; negative ints and slice bounds count from the end of the prompt.

Typical activation (for ``Steer(relative=True)`` and ``Ablate(mode="mean")``): ``sae.stats``,
a :class:`~llamascope_sdk.feature_stats.FeatureStats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch

from .errors import FeatureIndexError, SaeNotFoundError
from .feature_stats import STATS_FILE, FeatureStats
from .sae import SAE

Positions = Union[Literal["all", "prompt", "generated"], slice, Sequence[int]]  # noqa: UP007
Features = Union[int, Sequence[int], torch.Tensor]  # noqa: UP007
Values = Union[float, Sequence[float], torch.Tensor]  # noqa: UP007



def stats_for(sae: SAE) -> FeatureStats:
    """``sae.stats``, or a clear error naming how to get them."""
    if sae.stats is not None:
        return sae.stats
    folder = sae.source.path
    raise SaeNotFoundError(
        f"{sae.name}: no feature statistics (no {STATS_FILE} beside the checkpoint"
        f"{f' in {folder}' if folder else ''}, and sae.stats was not set)",
        hint="mine them with `llamascope inspect` (or llamascope_sdk.measure_feature_stats), "
             "or pass raw strengths / an explicit mean")


def _vector(v: Values, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        return t.expand(n).clone()
    if t.numel() != n:
        raise ValueError(f"{what} has {t.numel()} values for {n} features: give one value or "
                         "one per feature")
    return t


class Intervention:
    """Base of :class:`Steer`, :class:`Clamp`, :class:`Scale` and :class:`Ablate`.

    ``idx`` holds the validated feature indices; :meth:`target` maps old activations [..., n]
    to new ones.
    """

    sae: SAE
    features: Features
    positions: Positions
    idx: torch.Tensor

    def _validate(self) -> None:
        if not isinstance(self.sae, SAE):
            raise TypeError(f"{type(self).__name__}.sae must be an SAE, got {type(self.sae).__name__}")
        self.idx = self.sae.check_features(self.features)  # type: ignore[arg-type]  # checked there
        if self.idx.numel() == 0:
            raise FeatureIndexError(f"{type(self).__name__}: no features given")
        check_positions(self.positions)

    def target(self, old: torch.Tensor) -> torch.Tensor:  # noqa: ARG002  (the base refuses)
        """New activations [..., n] given the old ones; each subclass defines its own."""
        raise TypeError(f"{type(self).__name__} does not define target(); subclass Steer, "
                        "Clamp, Scale or Ablate")


@dataclass
class Steer(Intervention):
    """Add ``strength`` times each feature's unit decoder direction (per feature or one value).

    ``relative=True`` measures strength in units of the feature's typical activation
    (``sae.stats``), so 1.0 means "as strongly as when it usually fires".
    """

    sae: SAE
    features: Features
    strength: Values
    positions: Positions = "all"
    relative: bool = False

    def __post_init__(self) -> None:
        self._validate()

    def coefficients(self) -> torch.Tensor:
        """alpha [n] in model units, fp32 on the SAE's device."""
        alpha = _vector(self.strength, self.idx.numel(), "strength").to(self.sae.device)
        if self.relative:
            typical = stats_for(self.sae).typical.to(self.sae.device)[self.idx]
            dead = [int(i) for i, t in zip(self.idx, typical, strict=True) if not t > 0]
            if dead:
                raise ValueError(f"{self.sae.name}: feature {dead[0]} never fired on the stats "
                                 "text, so it has no typical activation; use a raw strength")
            alpha = alpha * typical
        return alpha

    def target(self, old: torch.Tensor) -> torch.Tensor:
        return old + self.coefficients().to(old)


@dataclass
class Clamp(Intervention):
    """Set the features' activations to ``value`` (one value or one per feature)."""

    sae: SAE
    features: Features
    value: Values
    positions: Positions = "all"

    def __post_init__(self) -> None:
        self._validate()

    def target(self, old: torch.Tensor) -> torch.Tensor:
        return _vector(self.value, old.shape[-1], "value").to(old).expand_as(old)


@dataclass
class Scale(Intervention):
    """Multiply the features' activations by ``factor``."""

    sae: SAE
    features: Features
    factor: Values
    positions: Positions = "all"

    def __post_init__(self) -> None:
        self._validate()

    def target(self, old: torch.Tensor) -> torch.Tensor:
        return old * _vector(self.factor, old.shape[-1], "factor").to(old)


@dataclass
class Ablate(Intervention):
    """Zero the features (``mode="zero"``) or set them to their mean activation (``"mean"``):
    ``mean`` given here (one value or one per feature), else from :func:`stats_for`."""

    sae: SAE
    features: Features
    mode: Literal["zero", "mean"] = "zero"
    positions: Positions = "all"
    mean: Values | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("zero", "mean"):
            raise ValueError(f"Ablate.mode must be 'zero' or 'mean', got {self.mode!r}")
        self._validate()

    def target(self, old: torch.Tensor) -> torch.Tensor:
        if self.mode == "zero":
            return torch.zeros_like(old)
        if self.mean is not None:
            mean = _vector(self.mean, old.shape[-1], "mean")
        else:
            mean = stats_for(self.sae).mean[self.idx.cpu()]
        return mean.to(old).expand_as(old)


def check_positions(positions: Positions) -> None:
    if isinstance(positions, str):
        if positions not in ("all", "prompt", "generated"):
            raise ValueError(f"positions={positions!r}: allowed are 'all', 'prompt', 'generated', "
                             "a slice or a list of ints")
    elif isinstance(positions, slice):
        if positions.step is not None and positions.step <= 0:
            raise ValueError("positions slice step must be positive")
    elif not all(isinstance(p, int) for p in positions):
        raise ValueError(f"positions must be 'all', 'prompt', 'generated', a slice or ints; "
                         f"got {positions!r}")


def position_mask(positions: Positions, pos_T: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Bool [T]: which absolute positions ``pos_T`` an intervention applies to."""

    def absolute(i: int) -> int:
        return i + prompt_len if i < 0 else i

    if positions == "all":
        return torch.ones_like(pos_T, dtype=torch.bool)
    if positions == "prompt":
        return pos_T < prompt_len
    if positions == "generated":
        return pos_T >= prompt_len
    if isinstance(positions, slice):
        start = 0 if positions.start is None else absolute(positions.start)
        keep = pos_T >= start
        if positions.stop is not None:
            keep &= pos_T < absolute(positions.stop)
        if positions.step not in (None, 1):
            keep &= (pos_T - start) % positions.step == 0
        return keep
    wanted = torch.tensor([absolute(p) for p in positions], dtype=pos_T.dtype, device=pos_T.device)
    return torch.isin(pos_T, wanted)
