"""Sample intake: the bounded queue of training samples waiting for a round.

Owns ``PendingSample`` (one token-level training example, the prefill version that served it) and
``SampleQueue`` (all-or-nothing offers, takes by lane (``pick_lane``), removal of aged samples,
requeue at the front for an abandoned round, checkpoint state). Pure: time comes from an injected clock.
Imports only the standard library and ``alchemist_sgl.errors``; never torch, sglang, or
alchemist_sgl.train / feedback.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal

from alchemist_sgl.errors import QueueFull

SampleKind = Literal["positive", "negative"]


@dataclass
class PendingSample:
    """One training example.

    ``prefill_version`` is the version that served the completion (None when the sample was not a
    served completion, e.g. ``POST /alchemist/train/samples`` without ``completion_id``): the
    trainer replays its recording only within ``train.max_version_lag`` of it. ``ref_logprobs``
    (one per response token) are the serving version's log-probs, for objectives that need a
    reference. ``enqueued_at`` is on the queue's clock. ``handle`` is an opaque pin of the
    sample's recording; it is never serialized (a restored sample recomputes its prompt).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    kind: SampleKind
    weight: float
    prefill_version: str | None
    completion_id: str | None
    ref_logprobs: list[float] | None
    enqueued_at: float
    source: str = "samples"
    feedback_id: str | None = None  # the feedback row this sample trains (marked trained after its step)
    handle: object | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("positive", "negative"):
            raise ValueError(f"sample kind {self.kind!r} is not 'positive' or 'negative'")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"sample weight {self.weight!r} must be a finite number > 0")
        if not self.response_ids:
            raise ValueError("a training sample needs at least one response token")
        if self.ref_logprobs is not None and len(self.ref_logprobs) != len(self.response_ids):
            raise ValueError(f"{len(self.ref_logprobs)} ref_logprobs for "
                             f"{len(self.response_ids)} response tokens")

    def as_state(self) -> dict[str, Any]:
        """JSON-able, without ``handle``."""
        d = dataclasses.asdict(dataclasses.replace(self, handle=None))
        del d["handle"]
        return d

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "PendingSample":
        return cls(**{k: v for k, v in d.items() if k != "handle"})


Lane = Literal["fresh", "approximate", "stale"]


def pick_lane(lags: list[int | None], max_version_lag: int) -> tuple[int | None, Lane]:
    """Note [Lanes]: given the lags of the queue's samples, oldest first (None: across a branch or
    never served), the index of the sample a round takes next and its lane:
      1. ``fresh``: the oldest sample at lag 0 (served at the round's version: exact replay);
      2. ``approximate``: else the NEWEST sample with 0 < lag <= ``max_version_lag`` (its
         recording is the least stale; replayed approximately, counted by lag);
      3. ``stale``: else the oldest sample, recomputed (its recording was released at publish).
    (None, "stale") for an empty queue."""
    for i, lag in enumerate(lags):
        if lag == 0:
            return i, "fresh"
    for i in range(len(lags) - 1, -1, -1):
        lag = lags[i]
        if lag is not None and 0 < lag <= max_version_lag:
            return i, "approximate"
    return (0, "stale") if lags else (None, "stale")


class SampleQueue:
    """FIFO of ``PendingSample`` bounded by ``max_pending`` (``train.max_pending_samples``).

    Contract: single-threaded (the scheduler process owns it). ``offer`` is all-or-nothing and
    raises ``QueueFull`` rather than dropping; ``requeue_front`` may exceed the bound (those
    samples were already accepted once and are never dropped).
    """

    def __init__(self, max_pending: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self._clock = clock
        self._items: deque[PendingSample] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, items: Iterable[PendingSample]) -> int:
        """Appends every item or none; returns how many were appended. Raises ``QueueFull``."""
        new = list(items)
        if len(self._items) + len(new) > self.max_pending:
            raise QueueFull(len(self._items), len(new), self.max_pending)
        self._items.extend(new)
        return len(new)

    def oldest_wait_s(self) -> float:
        """Seconds the front sample has waited (0.0 when empty)."""
        if not self._items:
            return 0.0
        return max(0.0, self._clock() - self._items[0].enqueued_at)

    def take(self, count: int) -> list[PendingSample]:
        """Removes and returns up to ``count`` samples, oldest first."""
        n = min(max(count, 0), len(self._items))
        return [self._items.popleft() for _ in range(n)]

    def take_next(self, lag_of: Callable[[PendingSample], int | None],
                  max_version_lag: int) -> tuple[PendingSample, Lane] | None:
        """Removes and returns the next sample of a round by lane (Note [Lanes]), or None."""
        index, lane = pick_lane([lag_of(p) for p in self._items], max_version_lag)
        if index is None:
            return None
        item = self._items[index]
        del self._items[index]
        return item, lane

    def has_fresh(self, lag_of: Callable[[PendingSample], int | None]) -> bool:
        """True when a pending sample was served at the serving version (lag 0)."""
        return any(lag_of(p) == 0 for p in self._items)

    def remove_where(self, predicate: Callable[[PendingSample], bool]) -> list[PendingSample]:
        """Removes and returns every pending sample ``predicate`` accepts, in queue order."""
        gone = [p for p in self._items if predicate(p)]
        if gone:
            self._items = deque(p for p in self._items if not predicate(p))
        return gone

    def __iter__(self) -> Iterator[PendingSample]:
        return iter(list(self._items))

    def requeue_front(self, items: Iterable[PendingSample]) -> None:
        """Puts samples of an abandoned or skipped step back at the front, in their order."""
        self._items.extendleft(reversed(list(items)))

    def state(self) -> list[dict[str, Any]]:
        """The pending samples, oldest first, without handles (for the checkpoint)."""
        return [s.as_state() for s in self._items]

    def load_state(self, state: list[dict[str, Any]]) -> None:
        """Replaces the contents with a checkpoint's samples (handles are None)."""
        self._items = deque(PendingSample.from_state(d) for d in state)
