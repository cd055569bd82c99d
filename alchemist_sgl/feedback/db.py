"""The one SQLite file (``feedback.db_path``) the completion log and the feedback store share.

Owns the schema (both sides create all of it, idempotently), the connection settings (WAL,
``synchronous=NORMAL``, ``busy_timeout``) and one connection per (process, thread). Imports only
the standard library and alchemist_sgl.errors; never torch or sglang.

Note [two processes, one file]: SGLang's scheduler process writes completions and reads feedback;
the HTTP process writes feedback (from worker threads, via ``asyncio.to_thread``) and reads
completions. WAL lets readers run beside the one writer; every write starts with
``BEGIN IMMEDIATE`` so it takes the write lock up front and waits ``busy_timeout`` for it, instead
of failing with SQLITE_BUSY when a read transaction would have to be upgraded.

Note [durability]: a commit in WAL mode with ``synchronous=NORMAL`` survives the death of the
process (``kill -9``): the WAL frames are in the OS page cache and are replayed on next open. Only a
power loss or OS crash can drop the last commits, which NORMAL trades for not fsyncing each one.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from alchemist_sgl.errors import FeedbackDbUnavailable

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    rid TEXT NOT NULL,
    choice_index INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'finished')),
    touched_at REAL NOT NULL,          -- clock() at mark_started / put: the TTL counts from here
    prompt_ids BLOB,                   -- array('i') little-endian int32
    output_ids BLOB,                   -- array('i') little-endian int32, through the stop token
    prefill_version TEXT,
    weight_versions TEXT,              -- JSON list of SGLang's span dicts
    finish_reason TEXT,
    created_at REAL,
    finished_at REAL,
    output_logprobs BLOB,              -- array('f') little-endian float32, NULL when not logged
    PRIMARY KEY (rid, choice_index)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS completions_touched ON completions (touched_at);
CREATE TABLE IF NOT EXISTS completion_tombstones (
    rid TEXT NOT NULL,
    choice_index INTEGER NOT NULL,
    purged_at REAL NOT NULL,
    PRIMARY KEY (rid, choice_index)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS completion_tombstones_purged ON completion_tombstones (purged_at);
CREATE TABLE IF NOT EXISTS feedback (
    feedback_id TEXT PRIMARY KEY,
    completion_id TEXT NOT NULL,
    choice_index INTEGER NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('up', 'down', 'score', 'correction')),
    rating TEXT CHECK (rating IN ('up', 'down')),
    score REAL,
    correction TEXT,
    comment TEXT,
    created_at REAL NOT NULL,
    api_key_hash TEXT,
    state TEXT NOT NULL
        CHECK (state IN ('pending', 'queued', 'deferred', 'trained', 'replaced', 'deleted')),
    trained_step INTEGER,
    retracted_as TEXT CHECK (retracted_as IN ('replaced', 'deleted')),
    answer_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_completion ON feedback (completion_id, choice_index);
CREATE INDEX IF NOT EXISTS feedback_state ON feedback (state);  -- (state, rowid): the poll
CREATE INDEX IF NOT EXISTS feedback_label ON feedback (label);
"""


def _migrate_v1(conn: sqlite3.Connection) -> None:
    """Version 1 -> 2: the feedback table's state may also be 'deferred' (SQLite cannot alter a
    CHECK constraint, so the table is rebuilt with the same rows, inside the caller's transaction)."""
    conn.execute("ALTER TABLE feedback RENAME TO feedback_v1")
    for index in ("feedback_completion", "feedback_state", "feedback_label"):
        conn.execute(f"DROP INDEX IF EXISTS {index}")
    table = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS feedback ("):]
    conn.execute(table[:table.index(";")])
    conn.execute("INSERT INTO feedback SELECT * FROM feedback_v1")
    conn.execute("DROP TABLE feedback_v1")


class FeedbackDb:
    """Connections to one SQLite file, one per (process, thread), each set up the same way.

    Contract: ``connection()`` is for the calling thread only; a process forked after use opens
    its own. ``write()`` is one ``BEGIN IMMEDIATE`` transaction, committed on exit and rolled back
    on an exception. ``close()`` requires quiescence: no thread may be inside a call.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[tuple[int, sqlite3.Connection]] = []  # (pid, connection)
        self._generation = 0  # bumped by close(), so threads reopen instead of using a closed one
        with self.write() as conn:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found not in (0, 1, SCHEMA_VERSION):
                raise FeedbackDbUnavailable(self.path, f"schema version {found}, this build reads "
                                            f"{SCHEMA_VERSION}")
            if found == 1:
                _migrate_v1(conn)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.key == (os.getpid(), self._generation):
            return conn
        # A connection inherited through fork() is never used nor closed here (SQLite forbids it).
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as e:
            raise FeedbackDbUnavailable(self.path, f"cannot open: {e}") from e
        if mode.lower() != "wal":
            conn.close()
            raise FeedbackDbUnavailable(self.path, f"journal_mode is {mode!r}, not 'wal'")
        with self._lock:
            self._local.conn, self._local.key = conn, (os.getpid(), self._generation)
            self._opened.append((os.getpid(), conn))
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: the statements inside see one snapshot."""
        conn = self.connection()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def close(self) -> None:
        """Closes this process's connections; a later call opens fresh ones."""
        pid = os.getpid()
        with self._lock:
            mine = [conn for owner, conn in self._opened if owner == pid]
            self._opened = []
            self._generation += 1
        for conn in mine:
            conn.close()
