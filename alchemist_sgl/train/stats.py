"""Numbers of the trainer: one step's ``StepStats`` and the cumulative ``TrainCounters``.

``TrainCounters`` is the trainer's part of the ``train`` block of ``/alchemist/status``. Pure
dataclasses; imports nothing from the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepStats:
    loss: float
    samples: int
    tokens: int                # prompt + response tokens trained
    replayed_tokens: int
    recomputed_tokens: int
    stale_recomputes: int
    reuse_by_lag: dict[int, int]
    step_ms: float             # busy time: the units themselves, not the gaps between them
    max_unit_ms: float         # the longest single unit (compare train.slice_budget_ms)
    version: int               # the trainer version the step ran at (set by the caller)
    units: int = 0             # work units run (a whole-sample step counts one per sample + 1)
    graph_samples: int = 0     # samples trained with graph replay (train/graph_layer.py)
    is_nonfinite_skipped: bool = False  # non-finite loss or gradient: no optimizer step taken


@dataclass
class TrainCounters:
    """Cumulative numbers for the ``train`` status block (docs/api.md)."""
    steps: int = 0
    samples_trained: int = 0
    tokens_trained: int = 0
    replayed_tokens: int = 0
    recomputed_tokens: int = 0
    stale_recomputes: int = 0
    loss_ema: float | None = None
    reuse_by_lag: dict[int, int] = field(default_factory=dict)
    nonfinite_skipped: int = 0
    graph_samples: int = 0

    def add(self, s: StepStats) -> None:
        """Counts a finished step; a skipped one only in ``nonfinite_skipped``."""
        if s.is_nonfinite_skipped:
            self.nonfinite_skipped += 1
            return
        self.steps += 1
        self.samples_trained += s.samples
        self.tokens_trained += s.tokens
        self.replayed_tokens += s.replayed_tokens
        self.recomputed_tokens += s.recomputed_tokens
        self.stale_recomputes += s.stale_recomputes
        self.graph_samples += s.graph_samples
        self.loss_ema = s.loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * s.loss
        for lag, n in s.reuse_by_lag.items():
            self.reuse_by_lag[lag] = self.reuse_by_lag.get(lag, 0) + n
