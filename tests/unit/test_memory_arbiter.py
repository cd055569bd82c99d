"""Trace tests of the memory arbiter (Note [Arbiter policy] in alchemist_sgl/memory.py).

Real policy, fake clock: each trace is a list of (seconds since the previous iteration, pressure).
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from alchemist_sgl.config import MemoryConfig, load_config
from alchemist_sgl.errors import ConfigError
from alchemist_sgl.memory.arbiter import (
    WINDOW_S, ArbiterDecision, MemoryArbiter, ServingPressure, kv_free_fraction)
from tests.support.arbiter import BASE, BUDGET, BUSY_MS, IDLE_MS, FakeClock

IDLE = ServingPressure(0, 0, 0, 1.0, 0)
BUSY = ServingPressure(1, 50, 2, 0.8, 0)             # calm: 1 < 0.5 * 4 waiting
BAND = ServingPressure(3, 300, 2, 0.8, 0)            # neither spike (3 < 4) nor calm (3 >= 2)
SPIKE = ServingPressure(8, 4000, 2, 0.8, 0)          # 8 >= waiting_requests_high


def make(cfg: MemoryConfig = BASE) -> tuple[MemoryArbiter, FakeClock]:
    clock = FakeClock()
    return MemoryArbiter(cfg, busy_slice_ms=BUSY_MS, idle_slice_ms=IDLE_MS, clock=clock), clock


def run(arb: MemoryArbiter, clock: FakeClock,
        trace: list[tuple[float, ServingPressure]]) -> list[tuple[float, ArbiterDecision]]:
    out = []
    for dt, pressure in trace:
        clock.t += dt
        out.append((clock.t, arb.decide(pressure)))
    return out


def transitions_of(decisions: list[tuple[float, ArbiterDecision]]) -> list[tuple[float, str, str]]:
    moves, state = [], "TRAINING"
    for t, d in decisions:
        if d.state != state:
            moves.append((t, state, d.state))
            state = d.state
    return moves


def check_invariants(cfg: MemoryConfig, arb: MemoryArbiter,
                     decisions: list[tuple[float, ArbiterDecision]]) -> list[tuple[float, str, str]]:
    """Every invariant of Note [Arbiter policy] on one trace; returns the transitions."""
    moves = transitions_of(decisions)
    assert arb.status()["transitions"] == len(moves)
    allowed = {("TRAINING", "YIELDING"), ("YIELDING", "PAUSED"),
               ("YIELDING", "TRAINING"), ("PAUSED", "TRAINING")}
    assert all((a, b) in allowed for _, a, b in moves), moves
    times = [t for t, _, _ in moves]
    for i, t0 in enumerate(times):  # the cap, in every 60 s window that starts at a transition
        assert sum(1 for t in times[i:] if t < t0 + WINDOW_S) <= cfg.max_transitions_per_minute
    for (t_prev, _, _), (t, a, b) in zip(moves, moves[1:]):  # dwell, spike entries exempt
        if (a, b) != ("TRAINING", "YIELDING"):
            assert t - t_prev >= cfg.min_dwell_s, (t_prev, t, a, b)
    entered_yield = None
    for t, a, b in moves:
        if b == "YIELDING":
            entered_yield = t
        if b == "PAUSED":  # paused only after pressure lasted pause_after_s since the entry
            assert entered_yield is not None and t - entered_yield >= cfg.pause_after_s
        if b == "TRAINING":  # recovered only after min_dwell_s without a spike
            assert not any(d.is_spike for u, d in decisions if t - cfg.min_dwell_s <= u <= t)
    for _, d in decisions:
        if d.is_spike:  # Note [Arbiter policy]: a spike never leaves a unit to start
            assert d.slice_ms == 0.0
        if d.state == "TRAINING":
            assert d.slice_ms in (BUSY_MS, IDLE_MS) and d.train_budget_bytes == BUDGET
        elif d.state == "YIELDING":
            assert d.slice_ms == 0.0 and d.train_budget_bytes == int(BUDGET * 0.25)
        else:
            assert d.slice_ms == 0.0 and d.train_budget_bytes == 0
    return moves


@pytest.mark.parametrize("spike", [
    SPIKE,
    ServingPressure(0, 0, 3, kv_free_fraction(50, 50, 1000), 0),   # KV 90 % used, nothing evictable
    ServingPressure(0, 0, 1, 0.9, 25),                              # 25 arrivals: EMA 5/s >= 4/s
    ServingPressure(1, 10, 2, 0.9, 0, recent_ttft_ms=3000.0),       # TTFT 3 s > 2 s in flight
], ids=["waiting", "kv", "arrivals", "ttft"])
def test_a_spike_yields_within_one_iteration(spike: ServingPressure) -> None:
    cfg = dataclasses.replace(BASE, arrival_rate_high_per_s=4.0, ttft_target_ms=2000.0)
    arb, clock = make(cfg)
    before = run(arb, clock, [(0.05, BUSY)] * 20)
    assert all(d.state == "TRAINING" and d.slice_ms == BUSY_MS for _, d in before)
    [(_, first)] = run(arb, clock, [(0.05, spike)])
    assert first.is_spike and first.state == "YIELDING" and first.slice_ms == 0.0
    assert first.train_budget_bytes == int(BUDGET * 0.25) and first.reason.startswith("spike")


def test_training_resumes_after_pressure_falls_and_the_dwell() -> None:
    arb, clock = make()
    decisions = run(arb, clock, [(0.1, SPIKE)] * 10 + [(0.1, IDLE)] * 40)
    check_invariants(BASE, arb, decisions)
    calm_from = decisions[10][0]
    resumed = next(t for t, d in decisions if t > calm_from and d.state == "TRAINING")
    assert resumed - calm_from == pytest.approx(BASE.min_dwell_s)
    assert all(d.slice_ms == 0 for t, d in decisions if t < resumed)
    assert decisions[-1][1].slice_ms == IDLE_MS and decisions[-1][1].train_budget_bytes == BUDGET
    assert arb.status()["transitions"] == 2


def test_the_hysteresis_band_neither_spikes_nor_recovers() -> None:
    arb, clock = make()
    assert all(d.state == "TRAINING" and not d.is_spike
               for _, d in run(arb, clock, [(0.1, BAND)] * 30))
    run(arb, clock, [(0.1, SPIKE)])
    held = run(arb, clock, [(0.1, BAND)] * 50)  # 5 s in the band: still yielded, not yet paused
    assert all(d.state == "YIELDING" and "hysteresis band" in d.reason for _, d in held)


def test_a_full_radix_cache_is_not_a_spike() -> None:
    full_cache = kv_free_fraction(available_tokens=20, evictable_tokens=900, pool_tokens=1000)
    assert full_cache == pytest.approx(0.92)
    arb, clock = make()
    decisions = run(arb, clock, [(0.1, ServingPressure(0, 0, 1, full_cache, 0))] * 30)
    assert all(d.state == "TRAINING" and not d.is_spike and d.slice_ms == BUSY_MS
               for _, d in decisions)
    no_evictable = kv_free_fraction(available_tokens=20, evictable_tokens=0, pool_tokens=1000)
    assert run(arb, clock, [(0.1, ServingPressure(0, 0, 1, no_evictable, 0))])[0][1].is_spike


def test_stale_ttft_does_not_hold_an_idle_server() -> None:
    cfg = dataclasses.replace(BASE, ttft_target_ms=2000.0)
    arb, clock = make(cfg)
    run(arb, clock, [(0.1, ServingPressure(2, 100, 2, 0.9, 0, recent_ttft_ms=9000.0))])
    assert arb.state == "YIELDING"
    decisions = run(arb, clock, [(0.1, ServingPressure(0, 0, 0, 1.0, 0, 9000.0))] * 30)
    assert decisions[-1][1].state == "TRAINING" and not any(d.is_spike for _, d in decisions)


def test_paused_after_sustained_pressure_then_recovers_directly() -> None:
    arb, clock = make()
    decisions = run(arb, clock, [(0.5, SPIKE)] + [(0.5, BAND)] * 30 + [(0.5, IDLE)] * 10)
    moves = check_invariants(BASE, arb, decisions)
    assert [(a, b) for _, a, b in moves] == [
        ("TRAINING", "YIELDING"), ("YIELDING", "PAUSED"), ("PAUSED", "TRAINING")]
    assert moves[1][0] - moves[0][0] == pytest.approx(BASE.pause_after_s)
    paused = [d for _, d in decisions if d.state == "PAUSED"]
    assert paused and all(d.train_budget_bytes == 0 and d.slice_ms == 0 for d in paused)


def test_a_flapping_trace_stays_yielded() -> None:
    """Pressure flips every iteration for 5 minutes: calm never lasts the dwell."""
    arb, clock = make()
    decisions = run(arb, clock, [(0.1, SPIKE if i % 2 == 0 else IDLE) for i in range(3000)])
    moves = check_invariants(BASE, arb, decisions)
    assert [(a, b) for _, a, b in moves] == [("TRAINING", "YIELDING")]


def test_a_noisy_trace_keeps_the_cap_and_the_dwell() -> None:
    """One spike iteration every 3 s, calm between: uncapped this would be 40 transitions/min."""
    cycle = [(0.5, SPIKE)] + [(0.5, IDLE)] * 5
    arb, clock = make()
    decisions = run(arb, clock, cycle * 100)  # 5 minutes of fake time
    moves = check_invariants(BASE, arb, decisions)
    assert any("held by the cap" in d.reason for _, d in decisions)  # the cap did bind ...
    assert sum(1 for _, _, b in moves if b == "TRAINING") >= 5 * 4  # ... and training still ran
    # entries and recoveries only: the window fills to the cap less the unused reserved pause
    busiest = max(sum(1 for u, _, _ in moves if t <= u < t + WINDOW_S) for t, _, _ in moves)
    assert busiest == BASE.max_transitions_per_minute - 1
    # every spike iteration yields at once, whatever the cap says
    assert all(d.slice_ms == 0 for _, d in decisions if d.is_spike)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_invariants_hold_on_random_traces(seed: int) -> None:
    rng = random.Random(seed)
    cfg = dataclasses.replace(BASE, arrival_rate_high_per_s=4.0, ttft_target_ms=2000.0,
                              min_dwell_s=rng.choice([0.0, 0.5, 2.0]),
                              max_transitions_per_minute=rng.choice([3, 5, 12]),
                              pause_after_s=rng.choice([1.0, 5.0]))
    arb, clock = make(cfg)
    regime, trace, t = "calm", [], 0.0
    while t < 300.0:
        if rng.random() < 0.1:
            regime = rng.choice(["calm", "band", "spike"])
        top = {"calm": 1, "band": 3, "spike": 10}[regime]
        waiting = rng.randint(0, top)
        pressure = ServingPressure(
            waiting, waiting * 100, rng.randint(0, 4), rng.uniform(0.05 if top > 3 else 0.6, 1.0),
            rng.choice([0, 0, 0, 1, 2 if top > 1 else 0]),
            rng.choice([None, rng.uniform(50.0, 800.0 * top)]))
        dt = rng.uniform(0.01, 0.6)
        trace.append((dt, pressure))
        t += dt
    decisions = run(arb, clock, trace)
    moves = check_invariants(cfg, arb, decisions)
    assert {b for _, _, b in moves} == {"TRAINING", "YIELDING", "PAUSED"}
    assert any("held by the cap" in d.reason for _, d in decisions)  # the cap was put to work


def test_disabled_arbiter_always_trains_with_the_plain_slices() -> None:
    arb, clock = make(dataclasses.replace(BASE, is_enabled=False))
    decisions = run(arb, clock, [(0.5, SPIKE)] * 40 + [(0.5, IDLE)] * 4)
    assert all(d.state == "TRAINING" and d.train_budget_bytes == BUDGET for _, d in decisions)
    assert decisions[0][1].is_spike and decisions[0][1].slice_ms == BUSY_MS
    assert decisions[-1][1].slice_ms == IDLE_MS
    assert arb.status()["transitions"] == 0 and arb.status()["reason"] == "arbiter disabled"


def test_arrival_rate_ema_is_an_impulse_average() -> None:
    arb, clock = make()  # tau 5 s
    run(arb, clock, [(0.0, ServingPressure(0, 0, 0, 1.0, 5))])
    assert arb.status()["arrival_rate_ema_per_s"] == pytest.approx(1.0)
    run(arb, clock, [(1.0, IDLE)] * 5)
    assert arb.status()["arrival_rate_ema_per_s"] == pytest.approx(2.718281828 ** -1)


def test_status_keys() -> None:
    arb, clock = make()
    first = arb.status()
    assert first["state"] == "TRAINING" and first["last_transition_at"] is None
    run(arb, clock, [(0.1, SPIKE)])
    clock.t += 1.5
    status = arb.status()
    assert set(status) == {"state", "transitions", "last_transition_at", "train_budget_bytes",
                           "is_enabled", "arrival_rate_ema_per_s", "dwell_s",
                           "transitions_last_minute", "is_spike", "reason", "recent_ttft_ms"}
    assert status["state"] == "YIELDING" and status["transitions"] == 1
    assert status["last_transition_at"] == pytest.approx(1000.1)
    assert status["train_budget_bytes"] == int(BUDGET * 0.25)
    assert status["dwell_s"] == pytest.approx(1.5) and status["transitions_last_minute"] == 1
    assert status["is_spike"] is True and "waiting_requests" in status["reason"]
    clock.t += WINDOW_S
    assert arb.status()["transitions_last_minute"] == 0


def test_memory_config_defaults_load_and_null_disables() -> None:
    cfg = load_config(None, ["memory.ttft_target_ms=null", "memory.arrival_rate_high_per_s=null"])
    assert cfg.memory.ttft_target_ms is None and cfg.memory.arrival_rate_high_per_s is None
    assert load_config(None).memory.max_transitions_per_minute >= 3


@pytest.mark.parametrize("item", [
    "memory.recover_fraction=0", "memory.recover_fraction=1.5", "memory.min_dwell_s=-1",
    "memory.max_transitions_per_minute=2", "memory.pause_after_s=0",
    "memory.yield_budget_fraction=2", "memory.arrival_rate_high_per_s=0",
    "memory.ttft_target_ms=-5", "memory.arrival_ema_tau_s=0", "memory.train_budget_bytes=-1",
    "memory.min_dwell_s=soon",
])
def test_bad_memory_keys_name_the_dotted_key(item: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    assert err.value.key == item.split("=")[0]
