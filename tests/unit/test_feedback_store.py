"""feedback/ratings.py and rows.py: durable, idempotent, last-wins feedback on real SQLite files.

Two store objects on one file stand for the HTTP and scheduler processes.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading

import pytest

from alchemist_sgl.errors import FeedbackInvalid
from alchemist_sgl.feedback import FeedbackInput, FeedbackStore, SqliteCompletionLog
from alchemist_sgl.feedback.completion_entry import CompletionEntry


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


@pytest.fixture
def db(tmp_path):
    return tmp_path / "feedback.sqlite"


@pytest.fixture
def http(db):
    return FeedbackStore(db, clock=Clock())


@pytest.fixture
def scheduler(db):
    return FeedbackStore(db, clock=Clock())


def up(cid: str, **kw) -> FeedbackInput:
    return FeedbackInput(completion_id=cid, rating="up", **kw)


def states(store: FeedbackStore, cid: str) -> list[tuple[str, str]]:
    """(feedback_id, state), oldest first."""
    return [(r["feedback_id"], r["state"]) for r in reversed(store.get(cid))]


def test_submit_is_durable_before_return(db, http):
    res = http.submit(FeedbackInput("c1", rating="down", comment="meh", api_key_hash="h"))
    assert res.status == "accepted" and len(res.feedback_id) == 32
    assert res.answer == {"feedback_id": res.feedback_id, "completion_id": "c1",
                          "status": "accepted"}
    with sqlite3.connect(db) as other:  # committed: another connection sees it
        assert other.execute("SELECT label, state, comment FROM feedback").fetchall() == [
            ("down", "pending", "meh")]
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert http._db.connection().execute("PRAGMA synchronous").fetchone()[0] == 1


def test_repeated_feedback_id_returns_first_answer_and_counts_once(http, scheduler):
    first = http.submit(up("c1", feedback_id="k1"))
    again = scheduler.submit(FeedbackInput("c2", rating="down", feedback_id="k1"))
    assert first.status == "accepted" and again.status == "duplicate"
    assert again.answer == first.answer and again.completion_id == "c1"
    assert http.get("c2") == [] and len(http.get("c1")) == 1
    assert http.counts_by_label()["up"] == 1 and http.pending_count() == 1


def test_feedback_id_of_another_key_is_refused(http):
    http.submit(up("c1", feedback_id="k1", api_key_hash="alice"))
    with pytest.raises(FeedbackInvalid) as err:
        http.submit(up("c1", feedback_id="k1", api_key_hash="bob"))
    assert err.value.field == "feedback_id"


def test_last_wins_replacement(http, scheduler):
    a = http.submit(up("c1"))
    other_choice = http.submit(up("c1", choice_index=1))
    b = scheduler.submit(FeedbackInput("c1", score=-0.5))
    assert b.status == "replaced" and b.answer["status"] == "replaced"
    assert states(http, "c1") == [(a.feedback_id, "replaced"),
                                  (other_choice.feedback_id, "pending"),
                                  (b.feedback_id, "pending")]
    assert [r.feedback_id for r in scheduler.pending(10)] == [other_choice.feedback_id,
                                                               b.feedback_id]


def test_trained_rows_are_never_replaced_or_deleted(http, scheduler):
    """Note [trained rows are facts]."""
    a = http.submit(up("c1"))
    assert scheduler.mark_queued([a.feedback_id]) == 1
    assert scheduler.mark_trained([a.feedback_id], step=3) == 1
    b = http.submit(FeedbackInput("c1", rating="down"))
    assert b.status == "replaced"
    rows = {r["feedback_id"]: r for r in http.get("c1")}
    assert rows[a.feedback_id]["state"] == "trained" and rows[a.feedback_id]["trained_step"] == 3
    assert rows[a.feedback_id]["retracted_as"] == "replaced"
    assert http.delete("c1") == 1  # b only
    assert states(http, "c1") == [(a.feedback_id, "trained"), (b.feedback_id, "deleted")]
    assert http.counts_by_state() == {"pending": 0, "queued": 0, "deferred": 0, "trained": 1,
                                      "replaced": 0, "deleted": 1}


def test_retracted_while_queued_then_trained_is_recorded(http, scheduler):
    a = http.submit(up("c1"))
    scheduler.mark_queued([a.feedback_id])
    http.delete("c1")
    assert scheduler.mark_trained([a.feedback_id], step=4) == 1  # the step ran with it
    (row,) = http.get("c1")
    assert (row["state"], row["trained_step"], row["retracted_as"]) == ("trained", 4, "deleted")


def test_requeue_after_restore(http, scheduler):
    """Note [exactly once]: rows trained after the restored step, and queued rows, go back."""
    old, new, queued, retracted, fresh = (http.submit(up(f"c{i}")).feedback_id for i in range(5))
    scheduler.mark_queued([old, new, queued, retracted])
    scheduler.mark_trained([old], step=2)
    scheduler.mark_trained([new, retracted], step=5)
    http.submit(FeedbackInput("c3", rating="down"))  # retracts the trained c3 row
    assert scheduler.requeue_after(3) == 2  # new, queued
    by_id = {r["feedback_id"]: r for i in range(5) for r in http.get(f"c{i}")}
    assert by_id[old]["state"] == "trained" and by_id[old]["trained_step"] == 2
    assert by_id[new]["state"] == "pending" and by_id[new]["trained_step"] is None
    assert by_id[queued]["state"] == "pending"
    assert by_id[retracted]["state"] == "replaced" and by_id[retracted]["retracted_as"] is None
    assert by_id[fresh]["state"] == "pending"
    assert scheduler.pending_count() == 4  # new, queued, fresh, and c3's down


def test_pending_poll_is_oldest_first_and_indexed(http, scheduler):
    ids = [http.submit(up(f"c{i}")).feedback_id for i in range(6)]
    assert [r.feedback_id for r in scheduler.pending(4)] == ids[:4]
    scheduler.mark_queued(ids[:2])
    assert [r.feedback_id for r in scheduler.pending(10)] == ids[2:]
    plan = " ".join(str(row) for row in scheduler._db.connection().execute(
        "EXPLAIN QUERY PLAN SELECT * FROM feedback WHERE state = 'pending' ORDER BY rowid LIMIT 5"))
    assert "feedback_state" in plan and "TEMP B-TREE" not in plan


def test_label_rule_and_bad_fields(http):
    res = http.submit(FeedbackInput("c1", rating="down", correction="Paris."))
    (row,) = http.get("c1")
    assert (row["label"], row["rating"], row["correction"]) == ("correction", "down", "Paris.")
    http.submit(FeedbackInput("c2", score=0.25))
    assert http.get("c2")[0]["label"] == "score" and res.status == "accepted"
    for fb, field in [(FeedbackInput("c", rating="meh"), "rating"),
                      (FeedbackInput("c", score=1.5), "score"),
                      (FeedbackInput("c", score=float("nan")), "score"),
                      (FeedbackInput("c", rating="up", score=0.5), "score"),
                      (FeedbackInput("c"), "rating"),
                      (FeedbackInput("", rating="up"), "completion_id"),
                      (FeedbackInput("c", choice_index=-1, rating="up"), "choice_index"),
                      (FeedbackInput("c", rating="up", correction=""), "correction"),
                      (FeedbackInput("c", rating="up", comment=3), "comment"),  # type: ignore
                      (FeedbackInput("c", rating="up", feedback_id=""), "feedback_id")]:
        with pytest.raises(FeedbackInvalid) as err:
            http.submit(fb)
        assert err.value.field == field
    assert http.counts_by_label() == {"up": 0, "down": 0, "score": 1, "correction": 1}


def _entry(rid: str, choice: int = 0) -> CompletionEntry:
    return CompletionEntry(rid=rid, choice_index=choice, prompt_ids=(1, 2), output_ids=(30, 31),
                           prefill_version="v1", weight_versions=(), finish_reason="stop",
                           created_at=1.0, finished_at=2.0)


def test_export_kto_for_each_label_kind(db, http):
    log = SqliteCompletionLog(db, ttl_s=3600.0)
    log.put_many([_entry(f"c{i}") for i in range(8)] + [_entry("c0", 1)])
    http.submit(up("c0"))
    http.submit(FeedbackInput("c0", choice_index=1, rating="down"))
    http.submit(FeedbackInput("c1", score=0.5))
    http.submit(FeedbackInput("c2", score=-0.2))
    http.submit(FeedbackInput("c3", score=0.0))  # stored, never exported
    http.submit(FeedbackInput("c4", rating="down", correction="better"))
    http.submit(up("c5"))
    http.submit(FeedbackInput("c5", rating="down"))  # last wins
    http.submit(up("c6"))
    http.delete("c6")
    http.submit(up("gone"))  # no log row
    rows = list(http.export_kto(log, lambda ids: " ".join(map(str, ids))))
    assert rows == [
        {"prompt": "1 2", "completion": "30 31", "label": True},   # c0 up
        {"prompt": "1 2", "completion": "30 31", "label": False},  # c0 choice 1 down
        {"prompt": "1 2", "completion": "30 31", "label": True},   # c1 score > 0
        {"prompt": "1 2", "completion": "30 31", "label": False},  # c2 score < 0
        {"prompt": "1 2", "completion": "better", "label": True},  # c4 correction
        {"prompt": "1 2", "completion": "30 31", "label": False},  # c5 latest: down
    ]
    assert all(type(r["label"]) is bool for r in rows)


def test_ratings_by_version_count_each_choices_latest_thumb_for_its_serving_version(db, http, scheduler):
    log = SqliteCompletionLog(db, ttl_s=3600.0)
    at = {"a0": "v0", "a1": "v0", "a2": "v0", "a3": "v0", "b0": "v1", "b1": "v1", "b2": "v1",
          "b3": "v1", "b4": "v1"}
    log.put_many([dataclasses.replace(_entry(rid), prefill_version=v) for rid, v in at.items()]
                 + [dataclasses.replace(_entry("a0", 1), prefill_version="v0"),
                    dataclasses.replace(_entry("x"), prefill_version=None)])
    log.mark_started(["running"])
    for rid in ("a0", "a1", "a2"):
        http.submit(up(rid))
    http.submit(FeedbackInput("a0", choice_index=1, rating="down"))  # its own choice: counts
    http.submit(FeedbackInput("a3", score=-1.0))  # a score is no thumb
    http.submit(FeedbackInput("b0", rating="down"))
    http.submit(up("b1"))
    http.submit(FeedbackInput("b1", rating="down"))  # last wins: one down, no up
    http.submit(FeedbackInput("b2", rating="down", correction="better"))  # a correction
    http.submit(FeedbackInput("b3", rating="down"))
    scheduler.mark_trained([r["feedback_id"] for r in scheduler.get("b3")], 5)
    http.submit(FeedbackInput("b4", rating="down"))
    http.delete("b4")  # deleted: no longer counts
    http.submit(up("x"))  # no serving version logged
    http.submit(up("running"))  # not finished
    http.submit(up("gone"))  # never logged
    # v0: a0, a1, a2 up and a0's choice 1 down; v1: b0, b1 and the trained b3 down
    assert scheduler.ratings_by_version() == {"v0": (3, 1), "v1": (0, 3)}
    http.submit(up("b3"))  # a trained row is retracted (replaced): its successor counts
    assert scheduler.ratings_by_version() == {"v0": (3, 1), "v1": (1, 2)}


def test_concurrent_submit_from_four_threads_loses_nothing(db):
    stores = [FeedbackStore(db), FeedbackStore(db)]  # two "processes", two threads each
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            store = stores[k % 2]
            for i in range(25):
                store.submit(up(f"t{k}-{i}"))
                store.submit(up("shared", feedback_id="same-key"))
                store.submit(FeedbackInput("contended", score=0.1 * (k + 1)))
        except BaseException as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert stores[0].counts_by_label() == {"up": 101, "down": 0, "score": 100, "correction": 0}
    assert len(stores[1].get("shared")) == 1
    contended = stores[1].get("contended")
    assert len(contended) == 100 and [r["state"] for r in contended].count("pending") == 1
    assert contended[0]["state"] == "pending"  # the newest row wins
    assert stores[0].pending_count() == 100 + 1 + 1


def test_deferred_rows_wait_out_a_restore_and_a_schema_1_file_migrates(http, scheduler, tmp_path):
    """Note [exactly once]: queued -> deferred -> (taken again) queued -> trained; a restore's
    ``requeue_after`` leaves deferred rows deferred. A file written by schema 1 (no 'deferred'
    state) is rebuilt in place with its rows."""
    from alchemist_sgl.feedback import db as dbmod

    old = tmp_path / "v1.sqlite"
    conn = sqlite3.connect(old)
    conn.executescript(dbmod._SCHEMA.replace("'queued', 'deferred', 'trained'", "'queued', 'trained'"))
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    v1 = FeedbackStore(old, clock=Clock())
    kept = v1.submit(up("c-old")).feedback_id
    v1.mark_queued([kept])
    assert v1.mark_deferred([kept]) == 1 and states(v1, "c-old") == [(kept, "deferred")]
    assert sqlite3.connect(old).execute("PRAGMA user_version").fetchone()[0] == dbmod.SCHEMA_VERSION

    a = http.submit(up("c1")).feedback_id
    assert scheduler.mark_queued([a]) == 1 and scheduler.mark_deferred([a]) == 1
    assert scheduler.pending(10) == [] and [r.feedback_id for r in scheduler.deferred(10)] == [a]
    assert scheduler.requeue_after(0) == 0 and states(http, "c1") == [(a, "deferred")]
    assert scheduler.mark_queued([a]) == 1 and scheduler.mark_trained([a], 4) == 1
    assert states(http, "c1") == [(a, "trained")] and scheduler.deferred(10) == []
