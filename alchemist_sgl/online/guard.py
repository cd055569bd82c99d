"""The feedback guard's decision: is a version rated worse than its parent, beyond a margin?

Owns ``Ratings`` (thumbs up and down counted for one version) and ``guard_verdict``, a pure
function of two ``Ratings`` and the ``publish.guard`` settings. What acts on a verdict (the
rollback, the registry's ``guarded`` state) is feedback_guard.py. Imports only the standard
library.

Note [The guard's test]: version V serves, trained from its parent P. With d down ratings out of n
(up + down) per version, the guard tests the one-sided hypothesis

    H0: down_rate(V) <= down_rate(P) + max_increase

with the Agresti-Caffo adjusted Wald statistic shifted by the margin: one up and one down are added
to each side, p_v = (d_v + 1) / (n_v + 2), p_p = (d_p + 1) / (n_p + 2), and

    z = (p_v - p_p - max_increase) / sqrt(p_v (1 - p_v) / (n_v + 2) + p_p (1 - p_p) / (n_p + 2)).

It fires when both versions have at least ``min_ratings`` ratings and z > z_{1-alpha}, the
standard normal quantile (``statistics.NormalDist``). The added pseudo-counts keep both p strictly
inside (0, 1), so the variance is never zero: a side rated all up or all down still gives a finite
z. ``max_increase`` tolerates a small rise (raters are noisy; a version that learned something
new may be judged differently); ``alpha`` bounds how often a version no worse than that is rolled
back by chance, per version tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist


@dataclass(frozen=True)
class Ratings:
    """Thumbs counted for the completions one version served."""

    up: int = 0
    down: int = 0

    @property
    def n(self) -> int:
        return self.up + self.down

    @property
    def down_rate(self) -> float | None:
        """down / n; None without ratings."""
        return self.down / self.n if self.n else None

    def as_status(self) -> dict[str, int | float | None]:
        return {"up": self.up, "down": self.down, "n": self.n, "down_rate": self.down_rate}


@dataclass(frozen=True)
class GuardVerdict:
    """``fires``: roll V back. ``z`` is None when a side lacks ``min_ratings`` (not tested)."""

    fires: bool
    z: float | None
    threshold: float
    reason: str


def adjusted_z(version: Ratings, parent: Ratings, max_increase: float) -> float:
    """The margin-shifted Agresti-Caffo z of Note [The guard's test]."""
    p_v = (version.down + 1) / (version.n + 2)
    p_p = (parent.down + 1) / (parent.n + 2)
    se = math.sqrt(p_v * (1 - p_v) / (version.n + 2) + p_p * (1 - p_p) / (parent.n + 2))
    return (p_v - p_p - max_increase) / se


def guard_verdict(version: Ratings, parent: Ratings, *, min_ratings: int, max_increase: float,
                  alpha: float) -> GuardVerdict:
    """Note [The guard's test] for ``version`` against its ``parent``."""
    threshold = NormalDist().inv_cdf(1 - alpha)
    if version.n < min_ratings or parent.n < min_ratings:
        return GuardVerdict(False, None, threshold,
                            f"too few ratings to judge ({version.n} and {parent.n}, "
                            f"need {min_ratings} each)")
    z = adjusted_z(version, parent, max_increase)
    if z > threshold:
        return GuardVerdict(True, z, threshold,
                            f"down-rate above the parent's + {max_increase:g} (z {z:.3f} > "
                            f"{threshold:.3f})")
    return GuardVerdict(False, z, threshold, f"z {z:.3f} <= {threshold:.3f}")
