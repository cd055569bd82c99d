"""Arrival processes: when each request is sent (pure functions of a seeded RNG).

Owns ``ArrivalSpec`` (a base Poisson rate plus optional bursts, i.e. a piecewise-constant-rate
trace) and ``arrival_times`` which turns it into send offsets in seconds from the run start,
bounded by a request count and a duration. Open loop: the times never depend on responses.
Must not import the server runtime or sglang.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Burst:
    """During ``[start_s, start_s + duration_s)`` requests arrive at ``rate_rps`` instead of the base rate."""

    start_s: float
    duration_s: float
    rate_rps: float


@dataclass(frozen=True)
class ArrivalSpec:
    """Poisson arrivals at ``rate_rps`` (``math.inf``: all at t=0), with optional bursts.

    ``rate_rps == 0`` outside bursts is allowed (a trace that is only bursts)."""

    rate_rps: float
    bursts: tuple[Burst, ...] = ()

    def __post_init__(self) -> None:
        if self.rate_rps < 0 or any(b.rate_rps < 0 or b.duration_s < 0 for b in self.bursts):
            raise ValueError(f"arrival rates and durations must be >= 0: {self}")
        spans = sorted((b.start_s, b.start_s + b.duration_s) for b in self.bursts)
        if any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])):
            raise ValueError(f"bursts overlap: {self.bursts}")

    def rate_at(self, t_s: float) -> float:
        for b in self.bursts:
            if b.start_s <= t_s < b.start_s + b.duration_s:
                return b.rate_rps
        return self.rate_rps


def _segments(spec: ArrivalSpec, horizon_s: float) -> list[tuple[float, float, float]]:
    """(start, end, rate) pieces covering [0, horizon_s); the last piece may end at infinity."""
    cuts = {0.0}
    for b in spec.bursts:
        cuts.update(x for x in (b.start_s, b.start_s + b.duration_s) if 0.0 <= x < horizon_s)
    edges = sorted(cuts) + [horizon_s]
    return [(a, b, spec.rate_at(a)) for a, b in zip(edges, edges[1:]) if b > a]


def arrival_times(
    spec: ArrivalSpec, max_requests: int, duration_s: float = math.inf, seed: int = 0
) -> list[float]:
    """Send offsets (seconds, non-decreasing, all < ``duration_s``), at most ``max_requests``.

    Exponential gaps within each constant-rate piece; at a piece boundary the process restarts
    (exact for a Poisson process, by memorylessness). An infinite rate sends the rest of the
    requests at the piece's start.
    """
    if max_requests < 0:
        raise ValueError("max_requests must be >= 0")
    rng = random.Random(seed)
    out: list[float] = []
    for start, end, rate in _segments(spec, duration_s):
        t = start
        while len(out) < max_requests and rate > 0:
            if math.isinf(rate):
                out.extend([start] * (max_requests - len(out)))
                break
            t += rng.expovariate(rate)
            if t >= end:
                break
            out.append(t)
        if len(out) >= max_requests:
            break
    return out
