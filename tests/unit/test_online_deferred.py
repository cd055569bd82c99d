"""Deferred feedback (online/loop.py, Note [Rounds]; feedback/ratings.py, Note [exactly once]) is
trained exactly once, also when the process dies while the row is deferred.

Real parts only: the loop over the tiny Llama (``build_loop``), the ``FeedbackPoller`` over a real
SQLite ``FeedbackStore`` and ``SqliteCompletionLog``, checkpoints on disk. A process death
(``kill -9``) is a process that stops between two scheduler iterations with no shutdown hook: here
the first loop, poller and connections are simply abandoned and a second set is built over the
same files, as a restarted server builds them (integration/training.py); SQLite's durability of
committed rows across ``kill -9`` itself is covered by tests/integration/test_feedback_api.py.
The clock is injected (``train.stale_max_age_s``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import torch

from alchemist_sgl.feedback.completion_log import SqliteCompletionLog
from alchemist_sgl.feedback.rows import FeedbackInput
from alchemist_sgl.feedback.ratings import FeedbackStore
from alchemist_sgl.feedback.completion_entry import CompletionEntry
from alchemist_sgl.online.feedback_poll import FeedbackPoller
from tests.support.loop_rig import BIG_MS, Rig, tokenize

torch.set_num_threads(1)


class Server:
    """What a (re)started server builds over the same files: the loop, the store, the poller."""

    def __init__(self, tmp: Path, clock_now: float) -> None:
        self.completions = SqliteCompletionLog(tmp / "feedback.sqlite", ttl_s=3600.0)
        self.store = FeedbackStore(tmp / "feedback.sqlite")
        # The poller is built with the loop and runs its after_restore there (runtime.build_loop).
        self.rig = Rig(tmp / "ckpt", ("train.stale_max_age_s=30", "feedback.poll_every_s=0.5"),
                       feedback=self.store, completions=self.completions)
        self.rig.clock.now = clock_now
        poller = self.rig.training.feedback
        assert poller is not None
        self.poller: FeedbackPoller = poller

    def iterate(self, n: int = 60) -> None:
        """Scheduler iterations: a poll, then a slice (runtime.on_train_slot)."""
        for _ in range(n):
            self.rig.clock.now += 1.0
            self.poller.poll()
            self.rig.loop.run_slice(BIG_MS)

    def state(self, completion_id: str) -> str:
        return self.store.get(completion_id)[0]["state"]


def _served(log: SqliteCompletionLog, rid: str, version: str, text: str) -> None:
    ids = tuple(tokenize(text))
    log.put(CompletionEntry(rid=rid, choice_index=0, prompt_ids=ids, output_ids=(40, 41, 2),
                            prefill_version=version, weight_versions=(), finish_reason="stop",
                            created_at=1.0, finished_at=2.0, output_logprobs=None))


def test_a_deferred_row_survives_a_process_death_and_trains_exactly_once(tmp_path: Path) -> None:
    first = Server(tmp_path, 1000.0)
    loop = first.rig.loop
    _served(first.completions, "chatcmpl-old", "v0", "An old question")
    loop.offer(first.rig.admission.admit([{"prompt": "Warm", "response": "up", "rating": "up"}]))
    first.iterate(3)
    assert first.rig.host.announced[-1] == "v1"  # chatcmpl-old is now a version old
    loop.is_paused = True
    first.store.submit(FeedbackInput(completion_id="chatcmpl-old", rating="up"))
    first.rig.clock.now += 1.0
    first.poller.poll()  # the stale sample is queued ...
    assert first.state("chatcmpl-old") == "queued" and len(loop.queue) == 1
    loop.offer(first.rig.admission.admit([{"prompt": "Fresh", "response": "one", "rating": "up"}]))
    first.rig.clock.now += 31.0  # ... and waits longer than train.stale_max_age_s
    loop.is_paused = False
    loop.run_slice(BIG_MS)  # the fresh sample first; its round publishes v2 and defers the row
    assert first.rig.host.announced[-1] == "v2"
    assert first.state("chatcmpl-old") == "deferred" and len(loop.queue) == 0
    assert loop.status()["train"]["samples_by_fate"]["deferred"] == 1
    loop.checkpoint(is_blocking=True)
    # The process dies here: nothing else runs, nothing is flushed.

    second = Server(tmp_path, first.rig.clock.now)
    assert second.state("chatcmpl-old") == "deferred"  # durable, not back to pending
    second.iterate(5)
    row = second.store.get("chatcmpl-old")[0]
    assert row["state"] == "trained" and row["trained_step"] == 3
    st = second.rig.loop.status()["train"]
    assert st["samples_by_fate"] == {"trained": 3, "deferred": 0, "dropped": 0, "expired": 0}
    assert st["samples_fed"] == 3 and st["samples_trained_by_lag"].get("2") == 1
    trained = second.rig.loop.trainer.counters.samples_trained
    second.iterate(5)  # more polls find nothing: the row is not trained a second time
    assert second.rig.loop.trainer.counters.samples_trained == trained
