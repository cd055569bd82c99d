"""The piece of work under way and the time slices that advance it (loop.py, Note [Work as a
generator]).

Owns ``WorkSlot``: it holds the work generator under way, asks for the next one when it ends, and
runs its units until a slice's budget is spent, keeping the unit and slice numbers in the loop's
``LoopCounters``. Imports package value types only; never sglang.
"""

from __future__ import annotations

import time
from typing import Callable, Generator

from alchemist_sgl.online.loop_types import LoopCounters, SliceReport

WAIT = "wait"  # yielded by work that cannot go on in this iteration (the slice ends)
Work = Generator[str, None, None]


class WorkSlot:
    """At most one piece of work under way; ``counters``: the loop's (units, slices, maxima)."""

    def __init__(self, counters: LoopCounters) -> None:
        self.counters = counters
        self.current: Work | None = None

    def run_slice(self, budget_ms: float, next_work: Callable[[], Work | None]) -> SliceReport:
        """Runs work units until ``budget_ms`` is spent (at least one unit when work is ready);
        ``next_work`` gives the next piece when none is under way (None: nothing to do)."""
        c = self.counters
        t0 = time.perf_counter()
        units = over = 0
        while units == 0 or (time.perf_counter() - t0) * 1000.0 < budget_ms:
            if self.current is None:
                self.current = next_work()
                if self.current is None:
                    break
            u0 = time.perf_counter()
            try:
                kind = next(self.current)
            except StopIteration:
                self.current = None
                continue
            if kind == WAIT:
                break
            unit_ms = (time.perf_counter() - u0) * 1000.0
            units += 1
            c.max_unit_ms = max(c.max_unit_ms, unit_ms)
            c.max_unit_ms_by_kind[kind] = max(c.max_unit_ms_by_kind.get(kind, 0.0), unit_ms)
            if unit_ms > budget_ms:
                over += 1
        if units:
            ms = (time.perf_counter() - t0) * 1000.0
            c.slices += 1
            c.units_run += units
            c.units_over_budget += over
            c.max_slice_ms = max(c.max_slice_ms, ms)
            return SliceReport(units, ms, over)
        return SliceReport(0, 0.0, 0)

    def close(self) -> None:
        """Drops the work under way (its generator's cleanup runs now)."""
        if self.current is not None:
            self.current.close()
            self.current = None
