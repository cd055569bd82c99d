"""SlicePacer (alchemist_sgl/interleave.py, Note [Slice debt]): pure policy, no fakes needed."""

from __future__ import annotations

import pytest

from alchemist_sgl.interleave import SlicePacer


def test_an_overrun_is_paid_off_by_skipped_busy_iterations() -> None:
    pacer = SlicePacer()
    assert pacer.may_run(30.0, is_busy=True)
    pacer.spent(30.0, 130.0, is_busy=True)  # one 130 ms unit against a 30 ms budget
    runs = [pacer.may_run(30.0, is_busy=True) for _ in range(5)]
    assert runs == [False, False, False, False, True]  # 100 ms of debt: 4 iterations pay it
    assert pacer.skipped == 4
    # On average the slice took (130 + 0 * 4) / 5 = 26 ms per busy iteration, under the budget.


def test_the_debt_is_capped_and_an_idle_iteration_clears_it() -> None:
    pacer = SlicePacer(max_skips=2)
    pacer.spent(30.0, 10_000.0, is_busy=True)
    assert pacer.debt_ms == 60.0
    assert not pacer.may_run(30.0, is_busy=True)
    assert pacer.may_run(500.0, is_busy=False) and pacer.debt_ms == 0.0
    pacer.spent(30.0, 20.0, is_busy=True)
    assert pacer.debt_ms == 0.0 and pacer.may_run(30.0, is_busy=True)
    pacer.spent(500.0, 900.0, is_busy=False)
    assert pacer.debt_ms == 0.0
    with pytest.raises(ValueError):
        SlicePacer(max_skips=-1)
