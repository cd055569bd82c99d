"""The recent-TTFT signal (memory.py, Note [TTFT window]) and the arbiter's reaction to it on a trace
(Note [Arbiter policy]): first tokens go into a real ``TtftWindow``, its value into each iteration's
``ServingPressure``, as ``serving_pressure`` in integration/training.py does. Fake clock only."""

from __future__ import annotations

import dataclasses

import pytest

from alchemist_sgl.memory.arbiter import MemoryArbiter, ServingPressure, TtftWindow
from tests.support.arbiter import BASE, BUSY_MS, IDLE_MS, FakeClock


def test_window_is_the_median_of_the_last_n_within_the_age() -> None:
    w = TtftWindow(size=4, max_age_s=10.0)
    assert w.value(0.0) is None
    for at, ms in [(0.0, 100.0), (1.0, 5000.0), (2.0, 200.0)]:
        w.add(ms, at)
    assert w.value(2.0) == 200.0  # one slow request does not move the median to it
    w.add(300.0, 3.0)
    assert w.value(3.0) == 250.0  # even count: the mean of the middle two (200, 300)
    w.add(400.0, 4.0)  # size 4: the first sample (100) leaves
    assert w.value(4.0) == 350.0  # median of 5000, 200, 300, 400
    assert w.value(10.5) == 350.0  # all four seen within the last 10 s
    assert w.value(11.5) == 300.0  # the 5000 (seen at 1.0) aged out: 200, 300, 400
    assert w.value(12.5) == 350.0  # 300, 400
    assert w.value(14.5) is None


def test_window_ages_out_a_past_burst() -> None:
    w = TtftWindow(size=8, max_age_s=10.0)
    for i in range(8):
        w.add(4000.0, float(i))
    assert w.value(7.0) == 4000.0
    w.add(100.0, 16.5)  # samples at 0..6 are older than 10 s at 16.5; 7.0 is not
    assert w.value(16.5) == (100.0 + 4000.0) / 2
    assert w.value(17.5) == 100.0
    assert w.value(30.0) is None
    assert w.count == 9
    with pytest.raises(ValueError):
        TtftWindow(size=0)


def _arbiter(target_ms: float) -> tuple[MemoryArbiter, FakeClock]:
    clock = FakeClock()
    cfg = dataclasses.replace(BASE, ttft_target_ms=target_ms)
    return MemoryArbiter(cfg, busy_slice_ms=BUSY_MS, idle_slice_ms=IDLE_MS, clock=clock), clock


def test_slow_first_tokens_yield_and_fast_ones_recover() -> None:
    """Calm queue and KV throughout; only TTFT moves. Spike: median > target; calm: below
    recover_fraction x target for min_dwell_s."""
    arb, clock = _arbiter(1000.0)
    window = TtftWindow(size=4, max_age_s=15.0)
    states = []

    def iteration(dt: float, first_token_ms: float | None, running: int = 2) -> None:
        clock.t += dt
        if first_token_ms is not None:
            window.add(first_token_ms, clock.t)
        pressure = ServingPressure(0, 0, running, 0.9, 0, recent_ttft_ms=window.value(clock.t))
        states.append(arb.decide(pressure).state)

    for _ in range(4):
        iteration(0.1, 300.0)
    assert states == ["TRAINING"] * 4
    iteration(0.1, 3000.0)           # one slow request: median of 300, 300, 300, 3000 = 300
    assert states[-1] == "TRAINING"
    iteration(0.1, 3000.0)           # median of 300, 300, 3000, 3000 = 1650 > 1000: yield now
    assert states[-1] == "YIELDING"
    assert arb.status()["recent_ttft_ms"] == 1650.0
    decision = arb.decide(ServingPressure(0, 0, 2, 0.9, 0, recent_ttft_ms=window.value(clock.t)))
    assert decision.slice_ms == 0.0 and "ttft" in decision.reason
    for _ in range(4):                # fast again: the median falls below 0.5 x 1000 ...
        iteration(0.1, 200.0)
    assert states[-1] == "YIELDING"   # ... but recovery needs min_dwell_s (2 s) of calm
    for _ in range(25):
        iteration(0.1, None)
    assert states[-1] == "TRAINING"
    assert arb.transitions == 2


def test_ttft_of_a_finished_burst_does_not_hold_an_idle_server() -> None:
    """Note [Arbiter policy]: TTFT counts only while requests wait or run."""
    arb, clock = _arbiter(1000.0)
    window = TtftWindow(size=4, max_age_s=15.0)
    for _ in range(4):
        clock.t += 0.1
        window.add(5000.0, clock.t)
        arb.decide(ServingPressure(0, 0, 1, 0.9, 0, recent_ttft_ms=window.value(clock.t)))
    assert arb.state == "YIELDING"
    for _ in range(30):  # idle: the window still holds 5000 ms, the arbiter ignores it
        clock.t += 0.1
        arb.decide(ServingPressure(0, 0, 0, 1.0, 0, recent_ttft_ms=window.value(clock.t)))
    assert window.value(clock.t) == 5000.0
    assert arb.state == "TRAINING"
