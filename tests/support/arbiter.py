"""The memory arbiter's test settings: a settable clock and a base config with arrivals and TTFT off.

Owns plain values; imports the package's ``MemoryConfig`` only.
"""

from __future__ import annotations

from alchemist_sgl.config import MemoryConfig

BUSY_MS, IDLE_MS, BUDGET = 30.0, 500.0, 1000
# Arrivals and TTFT off unless a test turns them on, so traces read by waiting requests alone.
BASE = MemoryConfig(train_budget_bytes=BUDGET, arrival_rate_high_per_s=None, ttft_target_ms=None,
                    min_dwell_s=2.0, max_transitions_per_minute=12, pause_after_s=10.0,
                    recover_fraction=0.5, yield_budget_fraction=0.25)


class FakeClock:
    """Seconds, set by the test through ``.t``."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t
