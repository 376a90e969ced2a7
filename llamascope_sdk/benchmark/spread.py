"""Reseed spreads: every benchmark number is a mean over n seeds with its standard deviation,
and two SAEs are compared with a rule that says when a difference is within the noise.

A :class:`Spread` keeps the per-seed values. ``std`` is the sample standard deviation
(n - 1 in the denominator; 0 for one seed). Two spreads differ beyond the noise when

    |mean_a - mean_b| > 2 * sqrt(std_a^2 / n_a + std_b^2 / n_b)

i.e. more than two standard errors of the difference (about a 95% two-sided band for normal
noise). With one seed there is no estimate of the noise, and a comparison says so
(``within_noise`` returns None) instead of calling any difference real.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Standard errors of the difference beyond which two SAEs are called different.
NOISE_Z = 2.0


@dataclass(frozen=True)
class Spread:
    """One metric over n seeds: the mean, the sample std and the values themselves."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n if self.values else float("nan")

    @property
    def std(self) -> float:
        if self.n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    def as_dict(self) -> dict[str, object]:
        return {"mean": self.mean, "std": self.std, "n_seeds": self.n,
                "values": list(self.values)}

    def text(self, digits: int = 3) -> str:
        """``0.912 ± 0.004 (n=3)``."""
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


def spread(values: Sequence[float]) -> Spread:
    """The spread of per-seed values (non-finite values are kept: they make the mean nan)."""
    return Spread(tuple(float(v) for v in values))


def within_noise(a: Spread, b: Spread, z: float = NOISE_Z) -> bool | None:
    """True when ``|a.mean - b.mean| <= z * SE(difference)``; None with fewer than 2 seeds on
    either side (no noise estimate)."""
    if a.n < 2 or b.n < 2:
        return None
    se = math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)
    return abs(a.mean - b.mean) <= z * se


__all__ = ["NOISE_Z", "Spread", "spread", "within_noise"]
