"""Conditions on edits: an edit that applies only at the positions where a reading is above a
threshold (conditional activation steering).

A condition reads one number per position of the running (steered) forward, at a site the
forward reaches no later than the edit's own site, and holds where that number is strictly
above ``above``:

* :class:`FeatureCondition`: the activation of one feature of an SAE (its encoder row only:
  ``sae.encode_features``), read at the SAE's input site, as ``llamascope encode`` reads it;
* :class:`DirectionCondition`: the projection ``x . v / |v|`` of the activation at a hook point
  on a direction ``v`` (CAST, Lee et al., ICLR 2025, gates a behaviour vector this way).

At a site that is both the condition's and the edit's, the condition reads the activation
before that site's edits (as :func:`~llamascope_sdk.steering.attachment.attach` reads
features). Special tokens (BOS, EOS, pad) never trigger a condition. With ``latch=True`` the
edit applies from the first position where the condition held to the end of the sequence.

Because the condition's site comes no later than the edit's, an edit never changes its own
condition at the same position, so one forward over a whole prompt decides every prompt
position exactly as checking the condition position by position would (tested against such a
loop in tests/test_conditions.py).
"""

from __future__ import annotations

import math

import torch

from llamascope_sdk.base.errors import InputError
from llamascope_sdk.core.sites import Site, parse_hook_point
from llamascope_sdk.loading.sae import SAE


class Condition:
    """Base of :class:`FeatureCondition` and :class:`DirectionCondition`: where it is read
    (``site``), the threshold (strictly above) and whether it latches."""

    above: float
    latch: bool
    site: Site

    def _check(self) -> None:
        if isinstance(self.above, bool) or not isinstance(self.above, (int, float)) or \
                not math.isfinite(self.above):
            raise InputError(f"condition threshold 'above' must be a finite number, got "
                             f"{self.above!r}")
        if not isinstance(self.latch, bool):
            raise InputError(f"condition 'latch' must be True or False, got {self.latch!r}")

    def values(self, x_BTD: torch.Tensor) -> torch.Tensor:  # noqa: ARG002  (the base refuses)
        """The reading [B, T] (fp32) at every position of ``x_BTD``, the activation at
        :attr:`site`; each subclass defines its own."""
        raise TypeError(f"{type(self).__name__} does not define values(); use "
                        "FeatureCondition or DirectionCondition")

    def holds(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Bool [B, T]: where the reading is strictly above the threshold."""
        return self.values(x_BTD) > self.above

    def check_before(self, edit_site: Site, what: str) -> None:
        """Refuse a condition read after ``edit_site`` in the forward.

        Raises:
            InputError: the condition's site comes later than the edit's.
        """
        if self.site.order > edit_site.order:
            raise InputError(f"{what}: the condition is read at {self.site.hook_point}, after "
                             f"the edit's site {edit_site.hook_point}; read it at the edit's "
                             "layer or an earlier one")

    def describe(self) -> str:
        """``"when feature 12 of demo > 1.5 (latched)"``: what the condition asks."""
        return f"when {self._reading()} > {self.above:g}" + (" (latched)" if self.latch else "")

    def _reading(self) -> str:
        return f"the reading at {self.site.hook_point}"


class FeatureCondition(Condition):
    """Holds where feature ``feature`` of ``sae`` is above ``above`` (model units).

    Example:
        >>> when = FeatureCondition(sae, 1297, above=2.0, latch=True)
        >>> Steer(sae, [4154], 40.0, when=when)
    """

    def __init__(self, sae: SAE, feature: int, above: float, *, latch: bool = False) -> None:
        self.sae, self.feature, self.above, self.latch = sae, feature, above, latch
        self._check()
        if not isinstance(sae, SAE):
            raise TypeError(f"FeatureCondition.sae must be an SAE, got {type(sae).__name__}")
        if isinstance(feature, bool) or not isinstance(feature, int):
            raise InputError(f"{sae.name}: condition feature must be one integer, got {feature!r}")
        self.idx = sae.check_features([feature])
        if sae.hyperparams.act_fn == "topk":
            raise InputError(f"{sae.name}: a condition reads one feature's encoder row, which "
                             "needs a threshold SAE (jumprelu/relu), not Top-K")
        self.site = parse_hook_point(sae.hyperparams.hook_point_in)

    def values(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.sae.encode_features(x_BTD.to(self.sae.dtype), self.idx)[..., 0].float()

    def _reading(self) -> str:
        return f"feature {self.feature} of {self.sae.name}"


class DirectionCondition(Condition):
    """Holds where the projection of the activation at ``hook_point`` on the unit direction
    ``direction / |direction|`` is above ``above`` (model units).

    Example:
        >>> DirectionCondition(v, "blocks.5.hook_resid_post", above=3.0)
    """

    def __init__(self, direction: torch.Tensor, hook_point: str, above: float, *,
                 latch: bool = False) -> None:
        self.above, self.latch = above, latch
        self._check()
        self.site = parse_hook_point(hook_point)
        v = torch.as_tensor(direction, dtype=torch.float32)
        if v.ndim != 1 or v.numel() == 0:
            raise InputError(f"condition direction must be a flat vector, got shape {list(v.shape)}")
        norm = float(torch.linalg.vector_norm(v))
        if not math.isfinite(norm) or norm == 0:
            raise InputError(f"condition direction must be finite and non-zero (norm {norm})")
        self.direction = v / norm  # unit

    def values(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if x_BTD.shape[-1] != self.direction.numel():
            raise InputError(f"condition direction has {self.direction.numel()} values, the "
                             f"activation at {self.site.hook_point} has {x_BTD.shape[-1]}")
        return x_BTD.float() @ self.direction.to(x_BTD.device)

    def _reading(self) -> str:
        return f"the projection on the direction at {self.site.hook_point}"


def gate(holds_BT: torch.Tensor, keep_BT: torch.Tensor, latch: bool,
         latched_B: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where an edit applies given its condition's readings of one forward.

    Args:
        holds_BT: where the condition holds at this forward's positions.
        keep_BT: False at special tokens and padding (these never trigger it).
        latch: apply from the first trigger onward.
        latched_B: per row, whether the condition held at an earlier forward of the sequence
            (latching only; None: never).

    Returns:
        (mask [B, T], latched [B] after this forward; None without ``latch``).
    """
    hit_BT = holds_BT & keep_BT
    if not latch:
        return hit_BT, None
    before_B = (latched_B if latched_B is not None
                else torch.zeros(hit_BT.shape[0], dtype=torch.bool, device=hit_BT.device))
    on_BT = (hit_BT.cumsum(dim=1) > 0) | before_B.to(hit_BT.device)[:, None]
    return on_BT, on_BT[:, -1] if on_BT.shape[1] else before_B


__all__ = ["Condition", "DirectionCondition", "FeatureCondition", "gate"]
