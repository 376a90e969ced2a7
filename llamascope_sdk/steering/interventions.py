"""Feature interventions: steer, clamp, scale and ablate SAE features inside a live model.

An intervention is plain data (which SAE, which features, what to do, where); ``attach``
in :mod:`llamascope_sdk.core.hooks` applies it. Semantics, for the clean activation y at the SAE's
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

Inputs are checked when an intervention is built, each error one line naming the argument:
feature indices must be integers in ``0..d_sae-1`` (an int, a flat list of ints, or a 1-D
integer tensor/array; bools, floats and nested lists are refused, never truncated), and every
strength, value, factor and mean must be a finite number (NaN/inf are refused), one value or
one per feature.

Typical activation (for ``Steer(relative=True)`` and ``Ablate(mode="mean")``): ``sae.stats``,
a :class:`~llamascope_sdk.core.feature_stats.FeatureStats`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch

from llamascope_sdk.base.errors import FeatureIndexError, InputError, SaeNotFoundError
from llamascope_sdk.core.feature_stats import STATS_FILE, FeatureStats
from llamascope_sdk.loading.sae import SAE

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
    """``v`` as fp32 [n]: one number (repeated) or one per feature; each finite.

    Raises:
        InputError: not numbers, bools, nested lists, the wrong count, or NaN/inf.
    """
    need = "give a finite number or a flat list of them, one per feature"
    if isinstance(v, bool) or (isinstance(v, (list, tuple))
                               and any(isinstance(x, bool) for x in v)):
        raise InputError(f"{what} must be a number, got a bool ({v!r}); {need}")
    try:
        t64 = torch.as_tensor(v, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{what} must be a number or a list of numbers, got {v!r}; {need}") from None
    if t64.dtype == torch.bool or t64.ndim > 1:
        raise InputError(f"{what} must be one value or a flat list, got shape {list(t64.shape)}; {need}")
    t64 = t64.reshape(-1).cpu()
    bad = (~torch.isfinite(t64)).nonzero()
    if bad.numel():
        i = int(bad[0])
        where = f" at position {i}" if t64.numel() > 1 else ""
        raise InputError(f"{what} must be finite, got {float(t64[i])}{where}; {need}")
    t = t64.float()
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{what} {float(t64.abs().max()):.3g} overflows float32; {need}")
    if t.numel() == 1:
        return t.expand(n).clone()
    if t.numel() != n:
        raise InputError(f"{what} has {t.numel()} values for {n} features: give one value or "
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
        if not isinstance(self.relative, bool):
            raise InputError(f"Steer.relative must be True or False, got {self.relative!r}")
        _vector(self.strength, self.idx.numel(), "Steer strength")
        if self.relative and self.sae.stats is not None:
            self.coefficients()  # a dead or non-finite typical activation fails here already

    def coefficients(self) -> torch.Tensor:
        """alpha [n] in model units, fp32 on the SAE's device."""
        alpha = _vector(self.strength, self.idx.numel(), "Steer strength").to(self.sae.device)
        if self.relative:
            typical = stats_for(self.sae).typical.to(self.sae.device)[self.idx]
            for i, t in zip(self.idx.tolist(), typical.tolist(), strict=True):
                if not math.isfinite(t):
                    raise InputError(f"{self.sae.name}: feature {i} has a non-finite typical "
                                     f"activation ({t}) in sae.stats; typical activations must "
                                     "be finite: re-measure the stats or use a raw strength")
                if not t > 0:
                    raise ValueError(f"{self.sae.name}: feature {i} never fired on the stats "
                                     "text, so it has no typical activation; use a raw strength")
            alpha = alpha * typical.float()
            if not bool(torch.isfinite(alpha).all()):
                raise InputError(f"{self.sae.name}: Steer strength times the typical "
                                 "activation overflows float32; use a smaller strength")
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
        _vector(self.value, self.idx.numel(), "Clamp value")

    def target(self, old: torch.Tensor) -> torch.Tensor:
        return _vector(self.value, old.shape[-1], "Clamp value").to(old).expand_as(old)


@dataclass
class Scale(Intervention):
    """Multiply the features' activations by ``factor``."""

    sae: SAE
    features: Features
    factor: Values
    positions: Positions = "all"

    def __post_init__(self) -> None:
        self._validate()
        _vector(self.factor, self.idx.numel(), "Scale factor")

    def target(self, old: torch.Tensor) -> torch.Tensor:
        return old * _vector(self.factor, old.shape[-1], "Scale factor").to(old)


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
            raise InputError(f"Ablate.mode must be 'zero' or 'mean', got {self.mode!r}")
        self._validate()
        if self.mean is not None:
            _vector(self.mean, self.idx.numel(), "Ablate mean")

    def target(self, old: torch.Tensor) -> torch.Tensor:
        if self.mode == "zero":
            return torch.zeros_like(old)
        if self.mean is not None:
            mean = _vector(self.mean, old.shape[-1], "Ablate mean")
        else:
            mean = stats_for(self.sae).mean[self.idx.cpu()]
        return mean.to(old).expand_as(old)


def edit_delta(iv: Intervention, x: torch.Tensor, f: torch.Tensor | None,
               m_BT: torch.Tensor) -> torch.Tensor:
    """The change [B, T, D] that ``iv`` makes to the activation at its SAE's output site, at
    the positions where ``m_BT`` is True: ``alpha @ W_dec[idx]`` for a steer, ``(new - old) @
    W_dec[idx]`` otherwise, with ``old`` the features' values for the clean input ``x`` (taken
    from a full encode ``f`` when given, else from their encoder rows only). In the SAE's dtype.
    :func:`~llamascope_sdk.steering.attachment.attach` and the batched generator both use it."""
    sae = iv.sae
    W_nD = sae.W_dec[iv.idx]
    m = m_BT[..., None].to(device=sae.device, dtype=sae.dtype)
    if isinstance(iv, Steer):
        return m * (iv.coefficients().to(sae.dtype) @ W_nD)  # [B, T, D]
    old = f[..., iv.idx] if f is not None else sae.encode_features(x, iv.idx)
    return (m * (iv.target(old) - old)) @ W_nD


def _is_int(p: object) -> bool:
    import numpy as np

    return isinstance(p, (int, np.integer)) and not isinstance(p, (bool, np.bool_))


def check_positions(positions: Positions) -> None:
    """Raise :class:`InputError` unless ``positions`` is one of the forms in the module doc."""
    allowed = "allowed are 'all', 'prompt', 'generated', a slice of ints or a list of ints"
    if isinstance(positions, str):
        if positions not in ("all", "prompt", "generated"):
            raise InputError(f"positions={positions!r}: {allowed}")
    elif isinstance(positions, slice):
        for part in ("start", "stop", "step"):
            v = getattr(positions, part)
            if v is not None and not _is_int(v):
                raise InputError(f"positions slice {part} {v!r} is not an int; {allowed}")
        if positions.step is not None and positions.step <= 0:
            raise InputError(f"positions slice step must be positive, got {positions.step}; "
                             f"{allowed}")
    elif not isinstance(positions, (list, tuple, range)) or not all(_is_int(p) for p in positions):
        raise InputError(f"positions={positions!r}: {allowed}")


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
