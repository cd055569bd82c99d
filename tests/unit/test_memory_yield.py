"""Yield moves memory (train/offload.py, Note [Yield moves memory]) through the real online loop and
the real runtime: a step under way with ``memory.offload`` on moves its saved tensors to host when
the arbiter leaves TRAINING, and the step, finished after the yields, is bitwise the step without.

Real loop (``build_loop`` over the tiny Llama: tests/support/loop_rig.py), real
``MemoryArbiter``, real ``Runtime``; the clock and the serving pressure are the test's (no SGLang).
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import torch

from alchemist_sgl.memory.arbiter import MemoryArbiter, ServingPressure
from alchemist_sgl.runtime import Runtime, SchedulerInfo
from tests.support.arbiter import FakeClock
from tests.support.loop_rig import OFFLOAD, PAIRS, TINY_MS, Rig, adam_state, adapter_state

torch.set_num_threads(1)

CALM = ServingPressure(0, 0, 1, 0.9, 0)    # a request runs, nothing waits: train (busy slice)
SPIKE = ServingPressure(9, 900, 1, 0.9, 0)  # waiting requests far above the mark


def _trained(rig: Rig, between_units=lambda: None) -> tuple[dict, list]:
    rig.feed(*PAIRS)
    while rig.loop.run_slice(TINY_MS).units:
        between_units()
    return adapter_state(rig.loop), adam_state(rig.loop)


def _same(a: tuple[dict, list], b: tuple[dict, list]) -> bool:
    (ad_a, opt_a), (ad_b, opt_b) = a, b
    return (ad_a.keys() == ad_b.keys() and all(torch.equal(ad_a[k], ad_b[k]) for k in ad_a)
            and len(opt_a) == len(opt_b)
            and all(torch.equal(x[k], y[k]) for x, y in zip(opt_a, opt_b) for k in x))


def test_a_yield_between_any_two_units_moves_bytes_and_changes_nothing_else(tmp_path: Path) -> None:
    plain = _trained(Rig(tmp_path / "plain", OFFLOAD))
    rig = Rig(tmp_path / "yields", OFFLOAD)
    off = rig.loop.trainer.residency
    falls: list[tuple[int, int]] = []

    def yield_now() -> None:
        before = off.account.resident_bytes("device")
        moved = rig.loop.yield_memory()
        falls.append((moved, before - off.account.resident_bytes("device")))

    assert _same(plain, _trained(rig, yield_now))
    assert all(moved == fall for moved, fall in falls)  # the device pool falls by what moved
    assert sum(moved for moved, _ in falls) > 0, falls  # the units the backward had prefetched
    assert off.yield_moved_bytes == sum(moved for moved, _ in falls)
    assert off.late_reloads == 0  # the backward's own prefetch brought them back
    status = off.status()
    assert status["device_resident_bytes"] == status["host_resident_bytes"] == 0
    assert status["moved_to_device_bytes"] == status["moved_to_host_bytes"]
    assert rig.loop.yield_memory() == 0  # no step under way: nothing to move


def test_runtime_yields_memory_when_the_arbiter_leaves_training(tmp_path: Path) -> None:
    """Every unit boundary of a step sees a spike (YIELDING: no unit, the yield), then calm
    iterations 61 s later on the fake clock (no unit until calm lasted min_dwell_s), then the
    recovery (TRAINING: one unit)."""
    plain = _trained(Rig(tmp_path / "plain", OFFLOAD))
    rig = Rig(tmp_path / "rt", (*OFFLOAD, f"feedback.db_path={tmp_path / 'fb.sqlite'}"))
    clock = FakeClock()
    memory = dataclasses.replace(rig.config.memory, is_enabled=True, min_dwell_s=2.0)
    arbiter = MemoryArbiter(memory, busy_slice_ms=0.001, idle_slice_ms=0.001, clock=clock)
    pressure = [CALM]
    runtime = Runtime(rig.config, SchedulerInfo(os.getpid(), "cpu", "tiny", "tiny"),
                      training=rig.training, arbiter=arbiter, pressure=lambda: pressure[0],
                      clock=clock)
    off = rig.loop.trainer.residency
    rig.feed(*PAIRS)
    spikes_in_step = units_before = cycles = 0
    for _ in range(10_000):
        cycles += 1
        in_step = rig.loop.has_step_in_progress
        pressure[0], clock.t = SPIKE, clock.t + 0.1
        runtime.on_train_slot(is_busy=True)
        assert arbiter.state == "YIELDING" and rig.loop.counters.units_run == units_before
        spikes_in_step += in_step
        pressure[0], clock.t = CALM, clock.t + 61.0  # calm begins, past the cap's window ...
        runtime.on_train_slot(is_busy=True)
        assert arbiter.state == "YIELDING" and rig.loop.counters.units_run == units_before
        clock.t += 2.5  # ... and has lasted min_dwell_s: recovery, one unit
        runtime.on_train_slot(is_busy=True)
        assert arbiter.state == "TRAINING"
        if rig.loop.counters.units_run == units_before:
            break  # no work left
        units_before = rig.loop.counters.units_run
    assert _same(plain, (adapter_state(rig.loop), adam_state(rig.loop)))
    assert spikes_in_step > 0 and off.yields == spikes_in_step  # one yield per spike mid-step
    assert off.yield_moved_bytes > 0 and off.late_reloads == 0
    runtime.add_status_section("arbiter", arbiter.status)
    assert runtime.status()["arbiter"]["transitions"] == 2 * cycles
