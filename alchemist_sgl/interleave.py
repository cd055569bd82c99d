"""Pacing of training slices while requests run: a debt that keeps training's share per iteration.

Owns ``SlicePacer``, a pure policy the runtime asks once per scheduler iteration. Imports nothing
of the package.

Note [Slice debt]: a slice always runs at least one work unit, so when one unit takes longer than
``train.slice_budget_ms`` (a decoder layer of a long sample on a slow CPU takes ~100 ms), every
decode iteration pays the whole unit and TPOT grows by it. The pacer records what a busy slice
spent beyond its budget as a debt; the next busy iterations skip training and each pays the
budget off it, so on average training takes about the budget per busy iteration. The debt is
capped at ``max_skips`` budgets (training never starves for long), and an idle iteration (nothing
waiting or running) clears it: no request is there to pay for it.
"""

from __future__ import annotations


class SlicePacer:
    def __init__(self, max_skips: int = 8) -> None:
        if max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {max_skips}")
        self.max_skips = max_skips
        self.debt_ms = 0.0
        self.skipped = 0  # iterations that skipped training to pay the debt (cumulative)

    def may_run(self, budget_ms: float, is_busy: bool) -> bool:
        """Whether this iteration may run a slice; when not, it pays ``budget_ms`` off the debt."""
        if not is_busy:
            self.debt_ms = 0.0
            return True
        if self.debt_ms <= 0.0:
            return True
        self.debt_ms = max(0.0, self.debt_ms - budget_ms)
        self.skipped += 1
        return False

    def spent(self, budget_ms: float, spent_ms: float, is_busy: bool) -> None:
        """A slice ran for ``spent_ms`` against ``budget_ms``: what it overran becomes the debt."""
        if not is_busy:
            self.debt_ms = 0.0
            return
        self.debt_ms = min(max(0.0, spent_ms - budget_ms), self.max_skips * budget_ms)
