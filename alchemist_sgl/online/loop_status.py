"""The online loop's status: the ``train`` and ``publish`` blocks of ``/alchemist/status``.

Owns ``loop_status``, read-only over an ``OnlineLoop`` (its counters, the round under way, the
sample fates and the round tally: accounting.py). Imports package modules only; never sglang.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

from alchemist_sgl.online.accounting import RoundTally, SampleFates, percentiles
from alchemist_sgl.online.intake import SampleQueue
from alchemist_sgl.online.loop_types import LoopCounters, OpenRound
from alchemist_sgl.online.publish import MasterWeights
from alchemist_sgl.online.disk_writer import BackgroundWriter
from alchemist_sgl.train.trainer import ReplayTrainer


class LoopView(Protocol):
    """What the status reads of the loop (``OnlineLoop`` is one); read-only."""

    counters: LoopCounters
    trainer: ReplayTrainer
    queue: SampleQueue
    state: str
    writer: BackgroundWriter
    master: MasterWeights
    current_round: OpenRound | None
    clock: Callable[[], float]
    round_s: float
    fates: SampleFates
    tally: RoundTally
    is_paused: bool
    is_replay_enabled: bool


def loop_status(loop: LoopView) -> dict[str, dict[str, Any]]:
    """The ``train`` and ``publish`` blocks of ``/alchemist/status`` (docs/api.md)."""
    return {"train": train_status(loop), "publish": publish_status(loop)}


def train_status(loop: LoopView) -> dict[str, Any]:
    """The ``train`` block; ``steps`` and ``nonfinite_skipped`` are the trainer's counters
    (train/stats.py)."""
    c = loop.counters
    return {**loop.trainer.status(), "samples_pending": len(loop.queue),
            "paused": loop.is_paused, "state": "paused" if loop.is_paused else loop.state,
            "units_run": c.units_run, "slices": c.slices,
            "units_over_budget": c.units_over_budget, "max_unit_ms": c.max_unit_ms,
            "max_unit_ms_by_kind": dict(c.max_unit_ms_by_kind),
            "max_slice_ms": c.max_slice_ms,
            "last_step_ms": c.last_step_ms, "last_loss": c.last_loss,
            "last_step_tokens": c.last_step_tokens, "last_grad_norm": c.last_grad_norm,
            "learning_rate": loop.trainer.optimizer.param_groups[0]["lr"],
            "writes_pending": loop.writer.pending, "write_failures": loop.writer.failures,
            **_round_status(loop)}


def publish_status(loop: LoopView) -> dict[str, Any]:
    """The ``publish`` block."""
    c = loop.counters
    return {"publishes": c.publishes, "rejected": c.rejected, "guarded": c.guarded,
            "last_publish_ms": c.last_publish_ms, "last_stall_ms": c.last_stall_ms,
            "master_bytes": loop.master.bytes, "recent": list(c.recent_publishes),
            "radix_hit_rate_since_publish": (c.window_cached_tokens / c.window_prompt_tokens
                                             if c.window_prompt_tokens else None)}


def _round_status(loop: LoopView) -> dict[str, Any]:
    """The rounds keys of the ``train`` status block (Note [Rounds], accounting.py)."""
    r = loop.current_round
    now = loop.clock()
    block = None if r is None else {
        "version": r.version, "opened_s_ago": now - r.opened_at,
        "opened_at": time.time() - (now - r.opened_at), "fresh_samples": r.fresh,
        "stale_samples": r.stale, "replay": r.is_replay_enabled,
        "round_s": loop.round_s,
        "closes_in_s": max(0.0, loop.round_s - (now - r.opened_at)) if r.taken else None}
    return {"round": block, "replay": loop.is_replay_enabled,
            "samples_fed": loop.fates.fed, "samples_by_fate": loop.fates.as_status(),
            "samples_in_round": 0 if r is None else len(r.taken),
            "samples_trained_by_lag": dict(loop.tally.samples_trained_by_lag),
            "prompt_tokens_by_fate": dict(loop.tally.prompt_tokens_by_fate),
            "feedback_to_publish_s": percentiles(loop.tally.intake_to_publish_s),
            "busy_ms": loop.counters.busy_ms}
