"""The online loop's value types and the narrow surfaces it reaches its collaborators through.

Owns ``ServingHost`` (built in ``integration/``), ``RecordingSource`` (store/recordings.py over the
activation store), ``FeedbackSink`` (online/feedback_poll.py), ``LoopCounters`` (the loop's
checkpointed numbers; the step count is the trainer's, train/stats.py ``TrainCounters``),
``OpenRound`` (the round under way, loop.py Note [Rounds]) and ``SliceReport``. Imports torch (type
hints) and package value types only; never sglang.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from alchemist_sgl.online.accounting import TakenSample
from alchemist_sgl.online.intake import PendingSample
from alchemist_sgl.train.rounds import RoundRun
from alchemist_sgl.train.samples import LayerRows

# One piece of a pinned recording: (start, end, name -> [layers, tokens, width] or None: not
# covered), tiling the prompt in order (train/samples.py ``PromptSegment``).
RecordedSegment = tuple[int, int, "Mapping[str, torch.Tensor] | Mapping[str, LayerRows] | None"]


class ServingHost(Protocol):
    def can_publish(self) -> bool:
        """True when the live weights may change now (no chunked prefill in flight)."""

    def announce(self, version: str) -> None:
        """The served weights are now ``version``: stamp new admissions, SGLang's weight_version."""


class RecordingSource(Protocol):
    """A prompt's recording: pinned at admission, read at training, unpinned after its last unit.
    Handles are opaque to the loop."""

    def pin(self, prompt_ids: list[int], version: str) -> object | None: ...
    def segments(self, handle: object) -> Sequence[RecordedSegment]: ...
    def covered_tokens(self, handle: object) -> int: ...
    def unpin(self, handle: object) -> None: ...
    def release_versions(self, is_live: Callable[[str], bool]) -> int: ...


class FeedbackSink(Protocol):
    """Where the loop reports what became of feedback samples (feedback rows by id)."""

    def on_trained(self, feedback_ids: list[str], step: int) -> None:
        """The round trained them at ``step`` (-1: dropped, never to be taken again)."""

    def on_deferred(self, feedback_ids: list[str]) -> None:
        """Stale samples of these rows left the queue (loop.py, Note [Rounds])."""


@dataclass
class LoopCounters:
    """Cumulative numbers of the loop (checkpointed; ``train``/``publish`` status blocks). The
    optimizer steps taken (``steps``) and the skipped ones (``nonfinite_skipped``) are counted
    once, by the trainer (``trainer.counters``)."""

    attempts: int = 0             # rounds closed, skipped ones included (test injection counts these)
    train_state: int = 0          # optimizer steps ever taken on this lineage (Note [Lag ...])
    steps_since_publish: int = 0
    units_run: int = 0
    slices: int = 0
    units_over_budget: int = 0
    max_unit_ms: float = 0.0
    max_unit_ms_by_kind: dict[str, float] = field(default_factory=dict)
    max_slice_ms: float = 0.0
    publishes: int = 0
    rejected: int = 0
    guarded: int = 0              # versions the feedback guard rolled back (feedback_guard.py)
    busy_ms: float = 0.0          # trainer time of all rounds: building each sample (read-out,
                                  # graph rebuild), its units and the optimizer's
    last_step_ms: float | None = None
    last_loss: float | None = None
    last_step_tokens: int | None = None
    last_grad_norm: float | None = None
    last_publish_ms: float | None = None
    last_stall_ms: float | None = None
    last_publish_at: float = 0.0
    last_checkpoint_at: float = 0.0
    recent_publishes: list[dict[str, object]] = field(default_factory=list)
    window_cached_tokens: int = 0   # radix hits of requests finished since the last publish ...
    window_prompt_tokens: int = 0   # ... over their prompt tokens (Note [Radix hit rate])

    def add_finished_request(self, cached_tokens: int, prompt_tokens: int) -> None:
        """Note [Radix hit rate]: every finished request adds to the current publish window; a
        publish records the window's rate (``radix_hit_rate_before``) and opens a new one, so the
        rate after publish k is the "before" of publish k+1, and ``radix_hit_rate_since_publish``
        is the running one."""
        self.window_cached_tokens += int(cached_tokens)
        self.window_prompt_tokens += int(prompt_tokens)

    def close_radix_window(self) -> float | None:
        rate = (self.window_cached_tokens / self.window_prompt_tokens
                if self.window_prompt_tokens else None)
        self.window_cached_tokens = self.window_prompt_tokens = 0
        return rate


@dataclass
class OpenRound:
    """The round under way (Note [Rounds]): its version, its run and the samples it took."""

    version: str
    opened_at: float
    run: RoundRun
    is_replay_enabled: bool
    taken: list[PendingSample] = field(default_factory=list)
    tally: list[TakenSample] = field(default_factory=list)

    @property
    def fresh(self) -> int:
        """Samples of the fresh lane the round took (the rest came from the stale lanes)."""
        return sum(1 for t in self.tally if t.lane == "fresh")

    @property
    def stale(self) -> int:
        return len(self.tally) - self.fresh


@dataclass(frozen=True)
class SliceReport:
    units: int
    ms: float
    units_over_budget: int
