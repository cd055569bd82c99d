"""Feedback into training: the scheduler's poll of the feedback table (scheduler side).

Owns ``FeedbackPoller``: every ``every_s`` (an indexed query, cheap) it takes pending feedback
rows, turns each into a ``PendingSample`` (Note [Feedback to samples]), queues them and marks the
rows queued; after a step trains them, it marks them trained with that step. After a restore from
a checkpoint, rows trained after the checkpoint's step and rows only queued go back to pending, so
acknowledged feedback is trained exactly once (the restored queue's feedback samples are dropped
and re-admitted from the table). Deferred rows (stale for longer than ``train.stale_max_age_s``)
are taken again only when the queue is empty, after the pending ones. After each poll it tells
``on_polled`` how many rows it took (the feedback guard, feedback_guard.py). Imports package
modules only.

Note [Feedback to samples]:
  * ``up``: SFT on the served response (the completion's output ids through the stop token);
  * ``correction``: SFT on the correction text (+ end of sequence) after the original prompt, which
    reuses the prompt's recording (same prompt ids, same prefill version);
  * ``down``: the negative objective (``train.objective_negative``) on the served response; its
    reference log-probs are the SERVING version's untempered output log-probs logged at serving
    time (a moving reference: the version that produced the completion, not v0);
  * ``score`` s: the sign gives the kind, |s| the weight; a score of 0 is stored and never trained.
A completion that expired from the log since the feedback was accepted cannot be trained: the row
is marked trained at step -1 and counted in ``skipped``.
"""

from __future__ import annotations

import time
from typing import Callable

from alchemist_sgl.feedback.completion_log import SqliteCompletionLog
from alchemist_sgl.feedback.rows import FeedbackRow
from alchemist_sgl.feedback.ratings import FeedbackStore
from alchemist_sgl.log import get_logger
from alchemist_sgl.online.accounting import SampleFates
from alchemist_sgl.online.admission import SampleAdmission
from alchemist_sgl.online.intake import PendingSample, SampleKind, SampleQueue

logger = get_logger(__name__)


class FeedbackPoller:
    """``fates``: the loop's ``SampleFates`` (accounting.py, Note [Sample fates]): a new row is
    fed once; a deferred row taken again leaves ``deferred``; an unusable row is ``expired``."""

    def __init__(self, *, store: FeedbackStore, completions: SqliteCompletionLog,
                 admission: SampleAdmission, queue: SampleQueue,
                 tokenize: Callable[[str], list[int]], eos_id: int | None, fates: SampleFates,
                 every_s: float = 0.5, batch: int = 64,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.completions, self.admission, self.queue = store, completions, admission, queue
        self.fates = fates
        self.tokenize, self.eos_id = tokenize, eos_id
        self.every_s, self.batch, self.clock = every_s, batch, clock
        self._last = float("-inf")
        self.admitted = self.skipped = 0
        # Called after each poll with the number of rows it took (the feedback guard's check,
        # feedback_guard.py); None: nothing to tell.
        self.on_polled: Callable[[int], object] | None = None

    def poll(self) -> int:
        """Admits pending feedback (at most every ``every_s``); returns how many samples were
        queued. Then calls ``on_polled`` with the number of rows taken from the table."""
        now = self.clock()
        if now - self._last < self.every_s:
            return 0
        self._last = now
        taken, queued = self._take()
        if self.on_polled is not None:
            self.on_polled(taken)
        return queued

    def _take(self) -> tuple[int, int]:
        """(rows taken from the table, samples queued)."""
        room = self.queue_room()
        if room <= 0:
            return 0, 0
        rows = self.store.pending(min(self.batch, room))
        is_deferred = False
        if not rows and len(self.queue) == 0:  # the queue is idle: deferred rows go again
            rows, is_deferred = self.store.deferred(min(self.batch, room)), True
        if is_deferred:
            self.fates.deferred -= len(rows)
        else:
            self.fates.fed += len(rows)
        samples: list[PendingSample] = []
        queued: list[str] = []
        unusable: list[str] = []
        for row in rows:
            sample = self._sample(row)
            if sample is None:
                unusable.append(row.feedback_id)
            else:
                samples.append(sample)
                queued.append(row.feedback_id)
        if unusable:
            self.store.mark_trained(unusable, -1)
            self.skipped += len(unusable)
            self.fates.expired += len(unusable)
        if samples:
            self.queue.offer(samples)
            self.store.mark_queued(queued)
            self.admitted += len(samples)
        return len(rows), len(samples)

    def queue_room(self) -> int:
        return self.queue.max_pending - len(self.queue)

    def on_trained(self, feedback_ids: list[str], step: int) -> None:
        self.store.mark_trained(feedback_ids, step)

    def on_deferred(self, feedback_ids: list[str]) -> None:
        """Stale samples of these rows left the queue (loop.py, Note [Rounds]): the rows wait as
        "deferred" in the table until the queue is empty (feedback/ratings.py, Note [exactly once])."""
        self.store.mark_deferred(feedback_ids)

    def after_restore(self, step: int) -> int:
        """Rows trained after ``step`` or only queued go back to pending (see module docstring)."""
        saved = self.queue.state()
        kept = [p for p in saved if not p.get("feedback_id")]
        self.queue.load_state(kept)
        self.fates.fed -= len(saved) - len(kept)  # fed again when the table gives them back
        return self.store.requeue_after(step)

    def _sample(self, row: FeedbackRow) -> PendingSample | None:
        entry = self.completions.get(row.completion_id, row.choice_index)
        if entry is None:
            return None
        kind: SampleKind
        if row.label == "score":
            if not row.score:
                return None  # stored, never trained
            kind, weight = ("positive" if row.score > 0 else "negative"), abs(float(row.score))
        else:
            kind, weight = ("negative" if row.label == "down" else "positive"), 1.0
        response = list(entry.output_ids)
        ref = list(entry.output_logprobs) if entry.output_logprobs is not None else None
        if row.label == "correction":
            assert row.correction is not None, "a correction row carries its text (feedback/rows.py)"
            response = self.tokenize(row.correction) + ([self.eos_id] if self.eos_id is not None else [])
            ref = None
        if not response:
            return None
        if ref is not None and len(ref) != len(response):
            ref = None
        handle = self.admission.pin_prompt(list(entry.prompt_ids), entry.prefill_version)
        return PendingSample(prompt_ids=list(entry.prompt_ids), response_ids=response, kind=kind,
                             weight=weight, prefill_version=entry.prefill_version,
                             completion_id=row.completion_id, ref_logprobs=ref,
                             enqueued_at=self.clock(), source="feedback", handle=handle,
                             feedback_id=row.feedback_id)
