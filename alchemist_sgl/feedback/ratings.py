"""The feedback store: durable, idempotent feedback rows and their way into training.

Owns the ``feedback`` table of the feedback database (db.py): submit (idempotent on
``feedback_id``, last wins per (completion_id, choice_index)), read, delete, the pending poll the
scheduler drains, the trained-step bookkeeping that makes training exactly-once across restores,
counts for metrics, the thumbs per serving version (``ratings_by_version``, which reads the
completion log's table in the same file) and the TRL KTO export. Imports only the standard
library, alchemist_sgl.errors and feedback.*; never torch or sglang. The completion checks
(404/409/410, choice_index range) are the route's: this store stays dumb and durable.

Note [trained rows are facts]: a step that ran cannot be unlearned, so a row in state "trained"
never becomes "replaced" or "deleted". A later feedback or a DELETE sets its ``retracted_as``
instead: the row keeps counting as trained, drops out of the export, and, should a restore from an
older checkpoint undo its step (``requeue_after``), it takes the retracted state rather than going
back to "pending". A row replaced or deleted while "queued" and trained anyway by ``mark_trained``
becomes "trained" with ``retracted_as`` set: the step did run with it.

Note [exactly once]: rows go pending -> queued (taken into the sample queue) -> trained at step s
(``mark_trained``). After a restore from the checkpoint of step k, ``requeue_after(k)`` moves rows
trained after k, and rows queued but never trained, back to pending: each acknowledged feedback is
in exactly one checkpointed step. A queued row whose sample went stale for longer than
``train.stale_max_age_s`` becomes "deferred" (``mark_deferred``); deferred rows are taken again
(``deferred``, then ``mark_queued``) when the trainer's queue is empty. A restore leaves them
deferred, so they too are trained exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal

from alchemist_sgl.errors import FeedbackInvalid
from alchemist_sgl.feedback.db import FeedbackDb
from alchemist_sgl.feedback.rows import (LABELS, ROW_COLUMNS, STATES, FeedbackInput,
                                         FeedbackResult, FeedbackRow)

if TYPE_CHECKING:
    from alchemist_sgl.feedback.completion_log import SqliteCompletionLog

_EXPORT_PAGE_ROWS = 500
# The latest live row per (completion_id, choice_index): live, and no later live row on its key.
_LATEST_LIVE = (
    "f.state NOT IN ('replaced', 'deleted') AND f.retracted_as IS NULL "
    "AND NOT EXISTS (SELECT 1 FROM feedback AS g WHERE g.completion_id = f.completion_id "
    "AND g.choice_index = f.choice_index AND g.rowid > f.rowid "
    "AND g.state NOT IN ('replaced', 'deleted') AND g.retracted_as IS NULL)")
_LATEST_LIVE_PAGE = (
    "SELECT rowid, completion_id, choice_index, label, score, correction FROM feedback AS f "
    f"WHERE f.rowid > ? AND {_LATEST_LIVE} ORDER BY f.rowid LIMIT ?")
# Thumbs per serving version: the latest live up/down row of each choice, joined with the
# completion log's row (same database file, db.py), counted for the version that prefilled it.
_RATINGS_BY_VERSION = (
    "SELECT c.prefill_version, SUM(f.label = 'up'), SUM(f.label = 'down') FROM feedback AS f "
    "JOIN completions AS c ON c.rid = f.completion_id AND c.choice_index = f.choice_index "
    "WHERE f.label IN ('up', 'down') AND c.state = 'finished' AND c.prefill_version IS NOT NULL "
    f"AND {_LATEST_LIVE} GROUP BY c.prefill_version")


class FeedbackStore:
    """Feedback rows on the feedback database; any number of instances, in any processes.

    Contract: every write is one committed transaction before the call returns (db.py Note
    [durability]); safe to call from any thread (the HTTP side calls it via ``asyncio.to_thread``).
    """

    def __init__(self, path: str | os.PathLike[str],
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._db = FeedbackDb(path)

    def submit(self, fb: FeedbackInput) -> FeedbackResult:
        """Stores ``fb`` (pending), replacing the earlier feedback on its (completion_id,
        choice_index) (Note [trained rows are facts]). A known ``feedback_id`` stores nothing
        and returns the first answer ("duplicate"); one already used under another
        ``api_key_hash`` raises ``FeedbackInvalid("feedback_id")``. Raises ``FeedbackInvalid``
        naming the field on bad input."""
        fb.validate()
        now = self._clock()
        with self._db.write() as conn:
            if fb.feedback_id is not None:
                hit = conn.execute("SELECT answer_json, api_key_hash FROM feedback "
                                   "WHERE feedback_id = ?", (fb.feedback_id,)).fetchone()
                if hit is not None:
                    if hit[1] != fb.api_key_hash:
                        raise FeedbackInvalid("feedback_id", "is already used by another API key; "
                                              "send a fresh one")
                    answer = json.loads(hit[0])
                    return FeedbackResult(answer["feedback_id"], answer["completion_id"],
                                          "duplicate", answer)
            feedback_id = fb.feedback_id or uuid.uuid4().hex
            key = (fb.completion_id, fb.choice_index)
            earlier = conn.execute(
                "UPDATE feedback SET state = 'replaced' WHERE completion_id = ? "
                "AND choice_index = ? AND state IN ('pending', 'queued', 'deferred')", key).rowcount
            earlier += conn.execute(
                "UPDATE feedback SET retracted_as = 'replaced' WHERE completion_id = ? "
                "AND choice_index = ? AND state = 'trained' AND retracted_as IS NULL",
                key).rowcount
            status: Literal["accepted", "replaced"] = "replaced" if earlier else "accepted"
            answer = {"feedback_id": feedback_id, "completion_id": fb.completion_id,
                      "status": status}
            conn.execute(
                f"INSERT INTO feedback ({ROW_COLUMNS}, answer_json) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', NULL, NULL, ?)",
                (feedback_id, fb.completion_id, fb.choice_index, fb.label, fb.rating,
                 None if fb.score is None else float(fb.score), fb.correction, fb.comment, now,
                 fb.api_key_hash, json.dumps(answer)))
        return FeedbackResult(feedback_id, fb.completion_id, status, answer)

    def get(self, completion_id: str) -> list[dict[str, Any]]:
        """Every row of the completion (all choices, any state), newest first, as dicts of
        ``FeedbackRow``'s fields."""
        rows = self._db.connection().execute(
            f"SELECT {ROW_COLUMNS} FROM feedback WHERE completion_id = ? ORDER BY rowid DESC",
            (completion_id,)).fetchall()
        return [dataclasses.asdict(FeedbackRow(*r)) for r in rows]

    def delete(self, completion_id: str, choice_index: int | None = None) -> int:
        """Non-trained live rows of the completion (one choice, or all) become "deleted";
        trained ones get ``retracted_as = 'deleted'``. Returns how many became "deleted"."""
        where, args = "completion_id = ?", list[str | int]([completion_id])
        if choice_index is not None:
            where, args = where + " AND choice_index = ?", args + [choice_index]
        with self._db.write() as conn:
            deleted = conn.execute(f"UPDATE feedback SET state = 'deleted' WHERE {where} "
                                   "AND state IN ('pending', 'queued', 'deferred')", args).rowcount
            conn.execute(f"UPDATE feedback SET retracted_as = 'deleted' WHERE {where} "
                         "AND state = 'trained' AND retracted_as IS NULL", args)
        return deleted

    def pending(self, limit: int) -> list[FeedbackRow]:
        """Up to ``limit`` pending rows, oldest first (submit order); an indexed poll."""
        rows = self._db.connection().execute(
            f"SELECT {ROW_COLUMNS} FROM feedback WHERE state = 'pending' ORDER BY rowid LIMIT ?",
            (limit,)).fetchall()
        return [FeedbackRow(*r) for r in rows]

    def deferred(self, limit: int) -> list[FeedbackRow]:
        """Up to ``limit`` deferred rows, oldest first (Note [exactly once])."""
        rows = self._db.connection().execute(
            f"SELECT {ROW_COLUMNS} FROM feedback WHERE state = 'deferred' ORDER BY rowid LIMIT ?",
            (limit,)).fetchall()
        return [FeedbackRow(*r) for r in rows]

    def mark_queued(self, ids: Iterable[str]) -> int:
        """Pending or deferred rows among ``ids`` become "queued" (taken into the sample queue);
        one transaction. Returns how many."""
        with self._db.write() as conn:
            return sum(conn.execute("UPDATE feedback SET state = 'queued' WHERE feedback_id = ? "
                                    "AND state IN ('pending', 'deferred')", (i,)).rowcount
                       for i in ids)

    def mark_deferred(self, ids: Iterable[str]) -> int:
        """Queued rows among ``ids`` become "deferred"; one transaction. Returns how many."""
        with self._db.write() as conn:
            return sum(conn.execute("UPDATE feedback SET state = 'deferred' WHERE feedback_id = ? "
                                    "AND state = 'queued'", (i,)).rowcount for i in ids)

    def mark_trained(self, ids: Iterable[str], step: int) -> int:
        """Rows among ``ids`` not yet trained become "trained" at ``step`` (Note [trained rows
        are facts] for replaced/deleted ones); one transaction. Returns how many."""
        with self._db.write() as conn:
            return sum(conn.execute(
                "UPDATE feedback SET trained_step = ?, state = 'trained', retracted_as = CASE "
                "WHEN state IN ('replaced', 'deleted') THEN state ELSE retracted_as END "
                "WHERE feedback_id = ? AND state != 'trained'", (step, i)).rowcount for i in ids)

    def requeue_after(self, step: int) -> int:
        """After a restore from the checkpoint of ``step``: rows trained after it and rows
        queued go back to pending (retracted ones to their retracted state); Note [exactly
        once]. One transaction. Returns how many became pending."""
        with self._db.write() as conn:
            requeued = conn.execute(
                "UPDATE feedback SET state = 'pending', trained_step = NULL WHERE "
                "state = 'trained' AND trained_step > ? AND retracted_as IS NULL",
                (step,)).rowcount
            conn.execute("UPDATE feedback SET state = retracted_as, retracted_as = NULL, "
                         "trained_step = NULL WHERE state = 'trained' AND trained_step > ?",
                         (step,))
            requeued += conn.execute("UPDATE feedback SET state = 'pending' "
                                     "WHERE state = 'queued'").rowcount
        return requeued

    def pending_count(self) -> int:
        count: int = self._db.connection().execute(
            "SELECT COUNT(*) FROM feedback WHERE state = 'pending'").fetchone()[0]
        return count

    def counts_by_label(self) -> dict[str, int]:
        """Rows ever stored, by label (replays are not rows), every label present."""
        return self._counts("label", LABELS)

    def counts_by_state(self) -> dict[str, int]:
        return self._counts("state", STATES)

    def export_kto(self, completions: SqliteCompletionLog,
                   detokenize: Callable[[list[int]], str]) -> Iterator[dict[str, Any]]:
        """TRL KTO rows ``{"prompt", "completion", "label": bool}``, one per (completion_id,
        choice_index) whose latest feedback is live (not replaced, deleted or retracted): up ->
        True, down -> False, score -> score > 0 (0 is skipped), correction -> the correction as
        completion, True. Completions no longer in the log are skipped. Reads in pages, so no
        read transaction stays open between yields."""
        after = 0
        while True:
            page = self._db.connection().execute(
                _LATEST_LIVE_PAGE, (after, _EXPORT_PAGE_ROWS)).fetchall()
            if not page:
                return
            for rowid, completion_id, choice_index, label, score, correction in page:
                after = rowid
                if label == "score" and score == 0:
                    continue
                entry = completions.get(completion_id, choice_index)
                if entry is None:
                    continue
                completion = (correction if label == "correction"
                              else detokenize(list(entry.output_ids)))
                is_desirable = label in ("up", "correction") or (label == "score" and score > 0)
                yield {"prompt": detokenize(list(entry.prompt_ids)), "completion": completion,
                       "label": is_desirable}

    def ratings_by_version(self) -> dict[str, tuple[int, int]]:
        """{version: (up, down)}: each (completion_id, choice_index) whose latest live feedback
        is a thumb up or down counts once, for the version that served it (its completion log
        row's ``prefill_version``). Completions purged from the log (``feedback.completion_ttl_s``)
        no longer count. One read over the feedback and completion tables."""
        rows = self._db.connection().execute(_RATINGS_BY_VERSION).fetchall()
        return {str(version): (int(up), int(down)) for version, up, down in rows}

    def close(self) -> None:
        """Closes this process's connections (requires quiescence); later calls reopen."""
        self._db.close()

    def _counts(self, column: str, keys: tuple[str, ...]) -> dict[str, int]:
        counts = dict.fromkeys(keys, 0)
        counts.update(self._db.connection().execute(
            f"SELECT {column}, COUNT(*) FROM feedback GROUP BY {column}").fetchall())
        return counts
