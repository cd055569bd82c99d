"""A round: one optimizer step over samples that arrive while it is open.

Owns ``RoundRun`` (``ReplayTrainer.begin_round``): the online loop adds samples one at a time as
they arrive, runs each sample's work units (units.py, Note [Work units]) and closes the round with
one optimizer unit. Imports only torch and lower train/ modules: the trainer is a ``UnitTrainer``
(context.py), never imported.

Note [Round normalisation]: a batch step scales sample i's loss by w_i / sum(w) before its
backward. A round does not know sum(w) until it closes, so each sample's loss enters the adapter's
``.grad`` scaled by w_i alone, and the optimizer unit multiplies every gradient (and the reported
loss) by 1 / sum(w) of the samples the round took. In exact arithmetic this is the batch step over
the same samples; in floating point it differs by one rounding per element
(tests/unit/test_train_rounds.py checks 1e-6 in fp32). The KTO KL estimate used inside the round is
the one of the round's start, as in a batch step.

Contract: between ``begin_round`` and ``close`` (or ``abandon``) the base tensors and the adapter
must not change, and no other step may run: gradients accumulate in the adapter's ``.grad``.
"""

from __future__ import annotations

import torch

from alchemist_sgl.train.context import UnitTrainer
from alchemist_sgl.train.offload import long_lived_tensors
from alchemist_sgl.train.samples import PlanCounts, Sample
from alchemist_sgl.train.optimizer_unit import optimizer_unit
from alchemist_sgl.train.stats import StepStats
from alchemist_sgl.train.units import _Run, _count_units, check_unit_support, sample_units


class RoundRun:
    """One open optimizer step; samples join with ``add`` until ``close``."""

    def __init__(self, trainer: UnitTrainer, *, is_replay_enabled: bool | None = None) -> None:
        check_unit_support(trainer.config, trainer.layout)
        self.trainer, self.is_replay_enabled = trainer, is_replay_enabled
        trainer.adapter.train()
        trainer.optimizer.zero_grad(set_to_none=True)
        self.weight_sum, self.samples, self.tokens = 0.0, 0, 0
        self.counts = PlanCounts()
        self.busy_ms, self.max_unit_ms, self.units = 0.0, 0.0, 0
        self.loss, self.grad_norm = 0.0, 0.0
        self.is_nonfinite_skipped = self._is_injected = self.is_closed = False
        self._losses: list[torch.Tensor] = []
        self._ratios: list[torch.Tensor] = []
        self._runs: list[_Run] = []
        self.last_counts = PlanCounts()  # the plan counts of the sample added last
        self.offload = trainer.residency
        if self.offload is not None:
            self.offload.release_all()
            self.offload.protect(long_lived_tensors(trainer))

    def add(self, sample: Sample) -> _Run:
        """Plans ``sample`` (ValueError on a malformed one, before any work) and returns its work
        units as a run (``run_unit`` / ``is_done``). Run it to the end before the next ``add``."""
        if self.is_closed:
            raise RuntimeError("this round is closed")
        if self._runs and not self._runs[-1].is_done:
            raise RuntimeError("the previous sample of this round has units left")
        t = self.trainer
        planned = t.plan(sample, is_replay_enabled=self.is_replay_enabled)
        index = self.samples
        self.samples += 1
        self.weight_sum += planned.sample.weight
        self.counts.add(planned.counts)
        self.tokens += planned.input_ids.numel()
        units = sample_units(t, self.offload, index, planned, planned.sample.weight,
                             self._losses, self._ratios)
        run = _Run(units, _count_units(t, planned, True), is_grad=True)
        self._runs.append(run)
        self.last_counts = planned.counts
        return run

    def inject_nonfinite(self) -> None:
        """Test hook: a NaN goes into one adapter gradient just before the optimizer unit."""
        self._is_injected = True

    def close(self) -> StepStats:
        """The optimizer unit over every sample added (Note [Round normalisation]); the step's
        stats, the trainer's counters updated. ValueError when no sample was added."""
        if self.samples == 0:
            raise ValueError("a round never closes empty")
        if not self._runs[-1].is_done:
            raise RuntimeError("the last sample of this round has units left")
        self.is_closed = True
        self.loss, self.grad_norm, self.is_nonfinite_skipped = optimizer_unit(
            self.trainer, self._losses, self._ratios, is_injected=self._is_injected,
            grad_scale=1.0 / self.weight_sum)
        for run in self._runs:
            self.busy_ms += run.busy_ms
            self.max_unit_ms = max(self.max_unit_ms, run.max_unit_ms)
            self.units += run.units
        return self.trainer.record_step(self.loss, self.samples, self.tokens, self.counts,
                                        self.busy_ms, self.max_unit_ms, self.units + 1,
                                        self.is_nonfinite_skipped)

    def abandon(self) -> None:
        """Drops the round (rollback, shutdown): gradients zeroed, nothing stepped."""
        self.is_closed = True
        self.trainer.optimizer.zero_grad(set_to_none=True)
        if self.offload is not None:
            self.offload.release_all()
