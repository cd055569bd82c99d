"""The durable completion log: ``CompletionLog`` on SQLite, shared by the scheduler and HTTP
processes.

Owns the ``completions`` and ``completion_tombstones`` rows of the feedback database (db.py), their
encoding, the running -> finished -> expired life of a completion, and its TTL purge. Imports only
the standard library, alchemist_sgl.errors, feedback.completion_entry (the value type) and
feedback.db; never torch, sglang or online/.

Encoding: token ids are ``array('i')`` bytes (int32, little-endian); log-probs ``array('f')``
bytes (float32, little-endian: what SGLang computes, so a round trip rounds a Python float to
float32); ``weight_versions`` spans are JSON.

Note [one transaction per batch]: the scheduler calls ``put_many`` once per batch of finished
requests, before SGLang sends their final outputs on; one ``BEGIN IMMEDIATE`` ... ``COMMIT`` per
call costs one WAL append, and an entry that cannot be stored rolls the whole batch back.

Note [logical expiry]: a row counts as expired as soon as ``ttl_s`` has passed since it was last
touched (``mark_started`` or ``put``), whether or not ``purge_expired`` has run yet, so ``get``,
``state``, ``choices`` and ``len`` agree at every instant. ``purge_expired`` deletes the rows and
leaves a tombstone per (rid, choice_index), so a late lookup answers "expired" (410), not "never
seen" (404).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from array import array
from typing import Any, Callable, Iterable, Literal

from alchemist_sgl.errors import CompletionEntryInvalid
from alchemist_sgl.feedback.db import FeedbackDb
from alchemist_sgl.feedback.completion_entry import CompletionEntry

CompletionState = Literal["running", "finished", "expired"]

assert array("i").itemsize == 4 and array("f").itemsize == 4
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_SWAP = sys.byteorder == "big"  # stored little-endian, whatever the host


def _pack(typecode: str, values: Iterable[float], field: str) -> bytes:
    try:
        arr = array(typecode, values)
    except (OverflowError, TypeError) as e:
        kind = "int32 token ids" if typecode == "i" else "floats"
        raise CompletionEntryInvalid(field, f"must be {kind}: {e}") from e
    if _SWAP:
        arr.byteswap()
    return arr.tobytes()


def _unpack(typecode: str, data: bytes) -> tuple[Any, ...]:
    arr = array(typecode)
    arr.frombytes(data)
    if _SWAP:
        arr.byteswap()
    return tuple(arr)


def _row_of(e: CompletionEntry) -> tuple[Any, ...]:
    if not isinstance(e.rid, str) or not e.rid:
        raise CompletionEntryInvalid("rid", f"must be a non-empty string, got {e.rid!r}")
    choice = e.choice_index
    if not isinstance(choice, int) or isinstance(choice, bool) or choice < 0:
        raise CompletionEntryInvalid("choice_index", f"must be an int >= 0, got {choice!r}")
    for name in ("created_at", "finished_at"):
        value = getattr(e, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CompletionEntryInvalid(name, f"must be a finite number of seconds, got {value!r}")
    try:
        spans = json.dumps(list(e.weight_versions), allow_nan=False)
    except (TypeError, ValueError) as e_json:
        raise CompletionEntryInvalid("weight_versions", f"must be JSON dicts: {e_json}") from e_json
    logprobs = (None if e.output_logprobs is None
                else _pack("f", e.output_logprobs, "output_logprobs"))
    return (e.rid, e.choice_index, _pack("i", e.prompt_ids, "prompt_ids"),
            _pack("i", e.output_ids, "output_ids"), e.prefill_version, spans, e.finish_reason,
            float(e.created_at), float(e.finished_at), logprobs)


def _entry_of(row: tuple[Any, ...]) -> CompletionEntry:
    (rid, choice, prompt, output, prefill, spans, reason, created, finished, logprobs) = row
    return CompletionEntry(rid=rid, choice_index=choice, prompt_ids=_unpack("i", prompt),
                           output_ids=_unpack("i", output), prefill_version=prefill,
                           weight_versions=tuple(json.loads(spans)), finish_reason=reason,
                           created_at=created, finished_at=finished,
                           output_logprobs=None if logprobs is None else _unpack("f", logprobs))


class SqliteCompletionLog:
    """``CompletionLog`` on the feedback database; any number of instances, in any processes.

    Contract: every write is one committed transaction before the call returns (Note [one
    transaction per batch]); reads never return an expired row (Note [logical expiry]). Safe to
    call from any thread. ``ttl_s`` is ``feedback.completion_ttl_s``; ``tombstone_ttl_s`` (None =
    forever) bounds how long purged ids keep answering "expired".
    """

    def __init__(self, path: str | os.PathLike[str], ttl_s: float,
                 clock: Callable[[], float] = time.time,
                 tombstone_ttl_s: float | None = None) -> None:
        if not ttl_s > 0 or (tombstone_ttl_s is not None and not tombstone_ttl_s > 0):
            raise ValueError(f"need ttl_s > 0 and tombstone_ttl_s > 0 or None, got {ttl_s}, "
                             f"{tombstone_ttl_s}")
        self.ttl_s, self.tombstone_ttl_s = ttl_s, tombstone_ttl_s
        self._clock = clock
        self._db = FeedbackDb(path)

    def put(self, entry: CompletionEntry) -> None:
        """Stores ``entry`` as finished, replacing a running or finished row with its key."""
        self.put_many([entry])

    def put_many(self, entries: Iterable[CompletionEntry]) -> None:
        """Stores every entry in one transaction: all of them, or none on an error."""
        entries = list(entries)
        if not entries:
            return
        now = self._clock()
        with self._db.write() as conn:
            for e in entries:
                row = _row_of(e)
                conn.execute(
                    "INSERT OR REPLACE INTO completions (rid, choice_index, state, touched_at, "
                    "prompt_ids, output_ids, prefill_version, weight_versions, finish_reason, "
                    "created_at, finished_at, output_logprobs) "
                    "VALUES (?, ?, 'finished', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (row[0], row[1], now) + row[2:])
                conn.execute("DELETE FROM completion_tombstones WHERE rid = ? AND choice_index = ?",
                             row[:2])

    def mark_started(self, rids: Iterable[str | tuple[str, int]]) -> None:
        """Records requests as running, in one transaction; an item is a rid (choice 0) or a
        (rid, choice_index) pair. A row already finished is left as it is."""
        keys = [(r, 0) if isinstance(r, str) else (r[0], r[1]) for r in rids]
        for rid, choice in keys:
            if not isinstance(rid, str) or not rid:
                raise CompletionEntryInvalid("rid", f"must be a non-empty string, got {rid!r}")
            if not isinstance(choice, int) or isinstance(choice, bool) or choice < 0:
                raise CompletionEntryInvalid("choice_index",
                                             f"must be an int >= 0, got {choice!r}")
        if not keys:
            return
        now = self._clock()
        with self._db.write() as conn:
            conn.executemany("INSERT OR IGNORE INTO completions (rid, choice_index, state, "
                             "touched_at) VALUES (?, ?, 'running', ?)",
                             [(rid, choice, now) for rid, choice in keys])

    def get(self, rid: str, choice_index: int = 0) -> CompletionEntry | None:
        """The finished entry, or None when unknown, still running, or expired."""
        row = self._db.connection().execute(
            "SELECT rid, choice_index, prompt_ids, output_ids, prefill_version, weight_versions, "
            "finish_reason, created_at, finished_at, output_logprobs FROM completions "
            "WHERE rid = ? AND choice_index = ? AND state = 'finished' AND touched_at > ?",
            (rid, choice_index, self._cutoff())).fetchone()
        return None if row is None else _entry_of(row)

    def state(self, rid: str, choice_index: int = 0) -> CompletionState | None:
        """"running" | "finished" | "expired" (TTL passed or purged), or None: never seen."""
        key = (rid, choice_index)
        with self._db.read() as conn:
            row = conn.execute("SELECT state, touched_at FROM completions "
                               "WHERE rid = ? AND choice_index = ?", key).fetchone()
            if row is not None:
                return "expired" if row[1] <= self._cutoff() else row[0]
            tomb = conn.execute("SELECT 1 FROM completion_tombstones "
                                "WHERE rid = ? AND choice_index = ?", key).fetchone()
        return "expired" if tomb is not None else None

    def choices(self, rid: str) -> int:
        """How many choices of ``rid`` are logged and not expired (running or finished)."""
        count: int = self._db.connection().execute(
            "SELECT COUNT(*) FROM completions WHERE rid = ? AND touched_at > ?",
            (rid, self._cutoff())).fetchone()[0]
        return count

    def purge_expired(self) -> int:
        """Deletes the expired rows, running or finished, leaving a tombstone for each, and the
        tombstones older than ``tombstone_ttl_s``; one transaction. Returns rows purged."""
        now = self._clock()
        cutoff = now - self.ttl_s
        with self._db.write() as conn:
            conn.execute("INSERT OR REPLACE INTO completion_tombstones (rid, choice_index, "
                         "purged_at) SELECT rid, choice_index, ? FROM completions "
                         "WHERE touched_at <= ?", (now, cutoff))
            purged: int = conn.execute("DELETE FROM completions WHERE touched_at <= ?",
                                  (cutoff,)).rowcount
            if self.tombstone_ttl_s is not None:
                conn.execute("DELETE FROM completion_tombstones WHERE purged_at <= ?",
                             (now - self.tombstone_ttl_s,))
        return purged

    def __len__(self) -> int:
        """Finished, unexpired entries."""
        count: int = self._db.connection().execute(
            "SELECT COUNT(*) FROM completions WHERE state = 'finished' AND touched_at > ?",
            (self._cutoff(),)).fetchone()[0]
        return count

    def close(self) -> None:
        """Closes this process's connections (requires quiescence); later calls reopen."""
        self._db.close()

    def _cutoff(self) -> float:
        return self._clock() - self.ttl_s
