"""Control commands from the HTTP process to the scheduler process, carried in SQLite.

Owns a small durable command table. The HTTP process ``submit``s a command (a kind and a JSON
payload) and then rings SGLang's existing ``get_internal_state`` request, whose scheduler-side hook
runs every pending command (``Runtime.process_commands``) before it answers; the HTTP process then
reads the result row. So the payload travels through SQLite and the wake-up through SGLang's own
control path: no new IPC (Note [control doorbell]).

Both processes open the same file (``ALCHEMIST_SGL_CONTROL_DB``). Imports only the standard library.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    ok INTEGER,
    result TEXT
)
"""


@dataclass(frozen=True)
class Command:
    id: int
    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class CommandResult:
    id: int
    is_done: bool
    is_ok: bool
    result: object  # the handler's JSON value, or {"error": message} when not ok


class ControlQueue:
    """A command table shared by the HTTP and scheduler processes. Each call opens its own
    connection, so one instance may be used from any thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def submit(self, kind: str, payload: dict[str, Any]) -> int:
        with self._connect() as conn:
            cur = conn.execute("INSERT INTO commands (kind, payload, created_at) VALUES (?, ?, ?)",
                               (kind, json.dumps(payload), time.time()))
            assert cur.lastrowid is not None  # set by every INSERT
            return cur.lastrowid

    def pending(self) -> list[Command]:
        with self._connect() as conn:
            rows = conn.execute("SELECT id, kind, payload FROM commands WHERE done = 0 ORDER BY id").fetchall()
        return [Command(int(r[0]), str(r[1]), json.loads(r[2])) for r in rows]

    def complete(self, command_id: int, is_ok: bool, result: object) -> None:
        with self._connect() as conn:
            conn.execute("UPDATE commands SET done = 1, ok = ?, result = ? WHERE id = ?",
                         (1 if is_ok else 0, json.dumps(result), command_id))

    def result(self, command_id: int) -> CommandResult:
        with self._connect() as conn:
            row = conn.execute("SELECT done, ok, result FROM commands WHERE id = ?", (command_id,)).fetchone()
        if row is None:
            raise KeyError(command_id)
        done = bool(row[0])
        return CommandResult(command_id, done, bool(row[1]) if done else False,
                             json.loads(row[2]) if row[2] is not None else None)
