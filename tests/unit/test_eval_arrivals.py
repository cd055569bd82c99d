"""Arrival processes with a seeded RNG."""

from __future__ import annotations

import math

import pytest

from eval.loadgen.arrivals import ArrivalSpec, Burst, arrival_times


def test_poisson_is_seeded_sorted_and_bounded_by_count() -> None:
    a = arrival_times(ArrivalSpec(2.0), 50, seed=7)
    assert a == arrival_times(ArrivalSpec(2.0), 50, seed=7)
    assert a != arrival_times(ArrivalSpec(2.0), 50, seed=8)
    assert len(a) == 50 and a == sorted(a) and a[0] > 0


def test_poisson_rate_is_roughly_right() -> None:
    a = arrival_times(ArrivalSpec(5.0), 4000, seed=1)
    gaps = [b - x for x, b in zip([0.0] + a, a)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.2, rel=0.06)


def test_duration_bounds_the_trace() -> None:
    a = arrival_times(ArrivalSpec(10.0), 10_000, duration_s=3.0, seed=2)
    assert all(t < 3.0 for t in a)
    assert 15 < len(a) < 60  # ~30 expected; 5 sigma either side


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_times(ArrivalSpec(math.inf), 4) == [0.0] * 4


def test_bursts_raise_the_rate_inside_their_window() -> None:
    spec = ArrivalSpec(1.0, (Burst(start_s=20.0, duration_s=10.0, rate_rps=20.0),))
    a = arrival_times(spec, 100_000, duration_s=60.0, seed=3)
    inside = sum(20.0 <= t < 30.0 for t in a)
    outside = len(a) - inside
    assert inside > 120 and outside < 90  # ~200 vs ~50 expected
    assert spec.rate_at(25.0) == 20.0 and spec.rate_at(31.0) == 1.0


def test_burst_only_trace_without_duration_ends() -> None:
    a = arrival_times(ArrivalSpec(0.0, (Burst(1.0, 2.0, 5.0),)), 1000, seed=4)
    assert a and all(1.0 <= t < 3.0 for t in a)


def test_invalid_specs_raise() -> None:
    with pytest.raises(ValueError):
        ArrivalSpec(-1.0)
    with pytest.raises(ValueError):
        ArrivalSpec(1.0, (Burst(0, 5, 2), Burst(4, 5, 2)))
