"""The completion log: served completions that may still get feedback, keyed by (rid, choice).

Owns the ``CompletionLog`` protocol and ``BoundedCompletionLog`` (in memory, bounded by count and
TTL on an injected clock) over ``CompletionEntry`` (feedback/completion_entry.py: token ids, the
prefill version and SGLang's weight-version spans, the serving log-probs). The durable log lives in
feedback/; this one is what the scheduler process keeps. Imports only the standard library and
feedback/completion_entry.py; never torch, sglang or train.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Protocol, runtime_checkable

from alchemist_sgl.feedback.completion_entry import CompletionEntry as CompletionEntry  # re-export


@runtime_checkable
class CompletionLog(Protocol):
    def put(self, entry: CompletionEntry) -> None:
        """Stores ``entry``, replacing one with the same (rid, choice_index)."""

    def get(self, rid: str, choice_index: int = 0) -> CompletionEntry | None:
        """The entry, or None when unknown or expired."""

    def __len__(self) -> int: ...


class BoundedCompletionLog:
    """``CompletionLog`` in memory: at most ``max_entries`` (the oldest put goes first) and none
    older than ``ttl_s`` seconds since its put (``feedback.completion_ttl_s``), evicted on every
    access. ``evictions`` counts both kinds."""

    def __init__(self, max_entries: int = 10_000, ttl_s: float = 24 * 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError(f"need max_entries >= 1 and ttl_s > 0, got {max_entries}, {ttl_s}")
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, int], tuple[float, CompletionEntry]] = OrderedDict()
        self.evictions = 0

    def put(self, entry: CompletionEntry) -> None:
        now = self._clock()
        key = (entry.rid, entry.choice_index)
        self._entries.pop(key, None)
        self._entries[key] = (now, entry)
        self._expire(now)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1

    def get(self, rid: str, choice_index: int = 0) -> CompletionEntry | None:
        self._expire(self._clock())
        hit = self._entries.get((rid, choice_index))
        return None if hit is None else hit[1]

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._entries)

    def _expire(self, now: float) -> None:
        # Entries are in put order, so the expired ones are a prefix.
        while self._entries:
            put_at, _ = next(iter(self._entries.values()))
            if now - put_at < self.ttl_s:
                break
            self._entries.popitem(last=False)
            self.evictions += 1
