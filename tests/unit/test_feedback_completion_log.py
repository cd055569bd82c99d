"""feedback/completion_log.py (and db.py): the durable completion log on real SQLite files.

Two log objects on one file stand for the scheduler and HTTP processes.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading

import pytest

from alchemist_sgl.errors import CompletionEntryInvalid
from alchemist_sgl.feedback import SqliteCompletionLog
from alchemist_sgl.online.completions import CompletionEntry, CompletionLog


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def entry(rid: str, choice: int = 0, output: tuple[int, ...] = (7, 8, 2),
          logprobs: tuple[float, ...] | None = (-0.5, -1.25, -0.125)) -> CompletionEntry:
    return CompletionEntry(rid=rid, choice_index=choice, prompt_ids=(1, 2, 3), output_ids=output,
                           prefill_version="v1",
                           weight_versions=({"version": "v1", "start": 0, "end": 2},
                                            {"version": "v2", "start": 2, "end": 3}),
                           finish_reason="stop", created_at=10.0, finished_at=12.5,
                           output_logprobs=logprobs)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "var" / "feedback.sqlite"


def test_wal_synchronous_normal_and_busy_timeout(db):
    log = SqliteCompletionLog(db, ttl_s=60.0)
    conn = log._db.connection()
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    with sqlite3.connect(db) as other:  # journal_mode=WAL is a property of the file
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_round_trip_across_two_processes_objects(db):
    scheduler, http = SqliteCompletionLog(db, ttl_s=60.0), SqliteCompletionLog(db, ttl_s=60.0)
    assert isinstance(scheduler, CompletionLog)
    scheduler.put(entry("a"))
    scheduler.put(entry("a", 1, logprobs=None))
    assert http.get("a") == entry("a")  # float32-exact log-probs round-trip unchanged
    assert http.get("a", 1) == entry("a", 1, logprobs=None)
    assert http.get("a", 2) is None and http.get("b") is None
    assert len(http) == 2 and http.choices("a") == 2 and http.choices("b") == 0


def test_put_many_is_one_transaction(db):
    log = SqliteCompletionLog(db, ttl_s=60.0)
    begins: list[str] = []
    log._db.connection().set_trace_callback(
        lambda sql: begins.append(sql) if sql.startswith("BEGIN") else None)
    log.put_many([entry("a"), entry("b"), entry("c")])
    assert begins == ["BEGIN IMMEDIATE"] and len(log) == 3


def test_put_many_failing_entry_in_the_middle_leaves_nothing(db):
    log = SqliteCompletionLog(db, ttl_s=60.0)
    log.mark_started(["a", "b"])
    with pytest.raises(CompletionEntryInvalid) as err:
        log.put_many([entry("a"), entry("b", output=(1, 2**40)), entry("c")])
    assert err.value.field == "output_ids"
    assert len(log) == 0 and log.get("a") is None
    assert log.state("a") == "running" and log.state("c") is None


def test_bad_fields_are_named(db):
    log = SqliteCompletionLog(db, ttl_s=60.0)
    bad_spans = CompletionEntry("a", 0, (1,), (2,), "v1", ({"v": object()},), "stop", 1.0, 2.0)
    with pytest.raises(CompletionEntryInvalid) as err:
        log.put(bad_spans)
    assert err.value.field == "weight_versions"
    with pytest.raises(CompletionEntryInvalid) as err:
        log.put(entry("a", choice=-1))
    assert err.value.field == "choice_index"
    with pytest.raises(CompletionEntryInvalid) as err:
        log.mark_started([""])
    assert err.value.field == "rid"


def test_running_finished_expired_with_tombstone(db):
    """Note [logical expiry]: expired at ttl_s whether or not purged; a purge leaves a tombstone."""
    clock = Clock()
    scheduler = SqliteCompletionLog(db, ttl_s=100.0, clock=clock)
    http = SqliteCompletionLog(db, ttl_s=100.0, clock=clock)
    scheduler.mark_started(["a", ("a", 1), "stuck"])
    assert http.state("a") == "running" and http.get("a") is None and http.choices("a") == 2
    assert http.state("never") is None
    clock.t += 50
    scheduler.put_many([entry("a"), entry("a", 1)])
    scheduler.mark_started(["a"])  # never downgrades a finished row
    assert http.state("a") == "finished" and http.get("a") == entry("a")
    clock.t += 60  # "stuck" (running since t=1000) is past its TTL; "a" is not (put at 1050)
    assert http.state("stuck") == "expired" and http.state("a") == "finished"
    clock.t += 40  # 100 s since the put: expired before any purge
    assert http.state("a") == "expired" and http.get("a") is None and len(http) == 0
    assert scheduler.purge_expired() == 3
    assert http.state("a") == "expired" and http.state("a", 1) == "expired"
    assert http.state("stuck") == "expired" and http.state("never") is None
    assert http.choices("a") == 0 and scheduler.purge_expired() == 0


def test_tombstones_kept_for_tombstone_ttl(db):
    clock = Clock()
    log = SqliteCompletionLog(db, ttl_s=10.0, clock=clock, tombstone_ttl_s=100.0)
    log.put(entry("a"))
    clock.t += 10
    assert log.purge_expired() == 1 and log.state("a") == "expired"
    clock.t += 100
    log.purge_expired()
    assert log.state("a") is None


def test_writes_from_threads(db):
    log = SqliteCompletionLog(db, ttl_s=60.0)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(10):
                log.put_many([entry(f"t{k}-{i}"), entry(f"t{k}-{i}", 1)])
        except BaseException as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(log) == 80


def _child_put(log: SqliteCompletionLog) -> None:
    log.put(entry("from-child"))


def test_forked_child_opens_its_own_connection(db):
    log = SqliteCompletionLog(db, ttl_s=60.0)
    log.put(entry("from-parent"))  # the parent's connection exists before the fork
    child = multiprocessing.get_context("fork").Process(target=_child_put, args=(log,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert log.get("from-child") == entry("from-child") and len(log) == 2
