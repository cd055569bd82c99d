"""The feedback guard at work: rolls the serving version back when its thumbs say it got worse.

Owns ``FeedbackGuard``, built by the runtime next to the feedback poller (feedback_poll.py), whose
``on_polled`` hook it is: after a poll that took rows from the feedback table, the next check reads
the thumbs per version again (``FeedbackStore.ratings_by_version``: one query over the feedback
and completion tables; the counts are cached between polls and shown in each ``versions`` entry
of the status) and judges the serving version V against its parent P (guard.py, Note [The
guard's test]). When the test fires it rolls back to P through the loop's rollback (the parent's
weights, adapter and AdamW state served under a new id, so training goes on from P's state),
marks V ``guarded`` with the evidence in the version registry, counts it (``publish.guarded``,
``alchemist_guard_rollbacks_total``), logs a warning and checkpoints. Same contract as the loop:
scheduler thread only, between iterations. Imports package modules only; never sglang.

Each version is judged again only when new rows were seen, and rolled back at most once by the
guard. A rollback that must wait (a chunked prefill in flight) is tried at the next poll; one that
cannot happen (the parent's adapter is no longer kept) is logged as an error and not tried again.
The first poll after startup checks too: a restore from a checkpoint older than a guard rollback
serves the guarded version again (versions.py, Note [restore merges]), and it is rolled back anew.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

from alchemist_sgl.config import GuardConfig
from alchemist_sgl.log import get_logger
from alchemist_sgl.online.feedback_poll import FeedbackPoller
from alchemist_sgl.online.guard import GuardVerdict, Ratings, guard_verdict
from alchemist_sgl.online.loop_types import LoopCounters
from alchemist_sgl.online.versions import VersionInfo, VersionRegistry

logger = get_logger(__name__)

RatingsSource = Callable[[], dict[str, tuple[int, int]]]


class GuardedLoop(Protocol):
    """What the guard uses of the loop (``OnlineLoop`` is one)."""

    registry: VersionRegistry
    counters: LoopCounters

    def rollback(self, to: str) -> dict[str, Any]: ...

    def checkpoint(self, *, is_blocking: bool = False) -> None: ...


class FeedbackGuard:
    """``ratings``: {version: (up, down)} read from the feedback database."""

    def __init__(self, *, config: GuardConfig, loop: GuardedLoop, ratings: RatingsSource) -> None:
        self.config, self.loop, self._source = config, loop, ratings
        self._counts: dict[str, tuple[int, int]] | None = None  # None: read at the next use
        self._is_due = True  # the first poll checks (see the module docstring)
        self._done: set[str] = set()  # versions the guard rolled back or could not

    def ratings(self) -> dict[str, tuple[int, int]]:
        """{version: (up, down)} as of the last poll that took rows."""
        if self._counts is None:
            self._counts = self._source()
        return self._counts

    def on_polled(self, taken: int) -> dict[str, Any] | None:
        """The poller's hook: ``taken`` rows left the feedback table in this poll. Returns the
        rollback's answer when the guard fired."""
        if taken:
            self._counts, self._is_due = None, True
        if not self._is_due:
            return None
        self._is_due = False
        return self.check()

    def check(self) -> dict[str, Any] | None:
        """Judges the serving version against its parent and rolls it back when the test fires."""
        if not self.config.is_enabled:
            return None
        version = self.loop.registry.serving
        if version.parent is None or version.name in self._done:
            return None
        counts = self.ratings()
        mine = Ratings(*counts.get(version.name, (0, 0)))
        theirs = Ratings(*counts.get(version.parent, (0, 0)))
        gc = self.config
        verdict = guard_verdict(mine, theirs, min_ratings=gc.min_ratings,
                                max_increase=gc.max_increase, alpha=gc.alpha)
        if not verdict.fires:
            return None
        try:
            answer = self.loop.rollback(version.parent)
        except RuntimeError as exc:  # a chunked prefill is in flight: the next poll tries again
            self._is_due = True
            logger.info("feedback guard: rollback of %s waits: %s", version.name, exc)
            return None
        except (LookupError, ValueError) as exc:
            self._done.add(version.name)
            logger.error("feedback guard: %s should go back to %s but cannot: %s", version.name,
                         version.parent, exc)
            return None
        self._done.add(version.name)
        self._record(version, mine, theirs, verdict, str(answer["weight_version"]))
        return answer

    def _record(self, version: VersionInfo, mine: Ratings, theirs: Ratings,
                verdict: GuardVerdict, now_serving: str) -> None:
        gc = self.config
        evidence: dict[str, object] = {
            "parent": version.parent, "ratings": mine.as_status(),
            "parent_ratings": theirs.as_status(), "z": verdict.z,
            "threshold": verdict.threshold, "max_increase": gc.max_increase, "alpha": gc.alpha,
            "min_ratings": gc.min_ratings, "rolled_back_to": now_serving, "at": time.time()}
        self.loop.registry.mark_guarded(version.name, evidence)
        self.loop.counters.guarded += 1
        logger.warning("feedback guard: %s rated worse than its parent %s: down %d of %d vs %d "
                       "of %d, z %.3f > %.3f (max_increase %g, alpha %g); rolled back, now "
                       "serving %s", version.name, version.parent, mine.down, mine.n,
                       theirs.down, theirs.n, verdict.z or 0.0, verdict.threshold,
                       gc.max_increase, gc.alpha, now_serving)
        self.loop.checkpoint()  # a restart restores the rollback, not the guarded version


def attach_guard(poller: FeedbackPoller, config: GuardConfig, loop: GuardedLoop) -> FeedbackGuard:
    """A guard over the thumbs of ``poller``'s feedback store, called after each of its polls."""
    guard = FeedbackGuard(config=config, loop=loop, ratings=poller.store.ratings_by_version)
    poller.on_polled = guard.on_polled
    return guard
