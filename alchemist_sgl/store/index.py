"""The page index of the activation store: keys -> slots, LRU order, pins, tiers, eviction.

Owns which page lives in which slot of which tier and when a page leaves. Must not import sglang.

Note [Tiers and eviction]: tiers are tried in order device -> host -> dropped. A new page takes a
free device slot; if there is none, the least recently used UNPINNED device page is demoted to the
host tier (one slot copy) and its slot reused; with no device tier (budget 0, the CPU default) it
goes to the host tier directly. A full host tier evicts its least recently used unpinned page. If
every page of every tier is pinned, the new page is dropped (its tokens are simply not covered):
allocation never blocks and never fails. Pages not used for ``ttl_s`` expire the same way.
Pinned pages (samples queued for or in training) are never evicted or moved.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

from alchemist_sgl.prefix import PageKey
from alchemist_sgl.store.pool import SlotPool


@dataclass
class Page:
    """One stored page: ``tokens`` valid rows (page_tokens, or fewer for a tail) in ``pool[slot]``.

    ``tail_parent`` is the parent key for a tail page (see prefix.py Note [Tail keys]), else None.
    """

    key: PageKey
    pool: SlotPool
    slot: int
    tokens: int
    tail_parent: PageKey | None
    last_used_s: float
    pins: int = 0


class PageIndex:
    """Keys to pages over an ordered list of tiers. Single-threaded (the scheduler thread)."""

    def __init__(self, tiers: list[SlotPool], clock: Callable[[], float], ttl_s: float = math.inf
                 ) -> None:
        self.tiers = [t for t in tiers if t.num_slots > 0]
        self._clock = clock
        self._ttl_s = ttl_s
        self._pages: OrderedDict[PageKey, Page] = OrderedDict()  # oldest use first
        self._tail_lengths: dict[PageKey, dict[int, int]] = {}  # parent -> {tail tokens: count}
        self.evictions = 0
        self.expirations = 0
        self.demotions = 0

    def __len__(self) -> int:
        return len(self._pages)

    def __contains__(self, key: PageKey) -> bool:
        return key in self._pages

    def pages(self) -> Iterator[Page]:
        return iter(self._pages.values())

    def get(self, key: PageKey, touch: bool = True) -> Page | None:
        page = self._pages.get(key)
        if page is not None and touch:
            page.last_used_s = self._clock()
            self._pages.move_to_end(key)
        return page

    def tail_lengths(self, parent: PageKey) -> list[int]:
        """Tail lengths stored under ``parent``, longest first."""
        return sorted(self._tail_lengths.get(parent, {}), reverse=True)

    def insert(self, key: PageKey, pool: SlotPool, slot: int, tokens: int,
               tail_parent: PageKey | None) -> Page:
        """Publishes a fully written slot under ``key`` (which must be new)."""
        assert key not in self._pages
        page = Page(key, pool, slot, tokens, tail_parent, self._clock())
        self._pages[key] = page
        if tail_parent is not None:
            lengths = self._tail_lengths.setdefault(tail_parent, {})
            lengths[tokens] = lengths.get(tokens, 0) + 1
        return page

    def allocate(self) -> tuple[SlotPool, int] | None:
        """A slot for a new page, evicting or demoting as Note [Tiers and eviction]; None = drop."""
        self.expire()
        for depth, pool in enumerate(self.tiers):
            slot = pool.take()
            if slot is not None:
                return pool, slot
            victim = self._lru_unpinned(pool)
            if victim is None:
                continue
            slot = victim.slot
            lower = self.tiers[depth + 1:]
            if lower and self._demote(victim, lower):
                return pool, slot
            self._remove(victim)
            self.evictions += 1
            return pool, slot
        return None

    def _demote(self, page: Page, lower: list[SlotPool]) -> bool:
        for pool in lower:
            slot = pool.take()
            if slot is None:
                victim = self._lru_unpinned(pool)
                if victim is None:
                    continue
                self._remove(victim)
                self.evictions += 1
                slot = victim.slot
            pool.copy_slot(slot, page.pool, page.slot)
            page.pool, page.slot = pool, slot
            self.demotions += 1
            return True
        return False

    def _lru_unpinned(self, pool: SlotPool) -> Page | None:
        for page in self._pages.values():
            if page.pins == 0 and page.pool is pool:
                return page
        return None

    def _remove(self, page: Page) -> None:
        del self._pages[page.key]
        if page.tail_parent is not None:
            lengths = self._tail_lengths[page.tail_parent]
            lengths[page.tokens] -= 1
            if lengths[page.tokens] == 0:
                del lengths[page.tokens]
            if not lengths:
                del self._tail_lengths[page.tail_parent]

    def release_slot(self, pool: SlotPool, slot: int) -> None:
        """Returns a slot that was allocated but never published."""
        pool.give_back(slot)

    def expire(self) -> None:
        """Frees unpinned pages unused for ``ttl_s`` (the LRU front holds the oldest)."""
        if math.isinf(self._ttl_s):
            return
        deadline = self._clock() - self._ttl_s
        expired = []
        for page in self._pages.values():
            if page.last_used_s >= deadline:
                break
            if page.pins == 0:
                expired.append(page)
        for page in expired:
            self._remove(page)
            page.pool.give_back(page.slot)
            self.expirations += 1

    def drop_unpinned(self) -> int:
        """Frees every unpinned page (e.g. after a radix flush in an A/B run); returns the count."""
        victims = [p for p in self._pages.values() if p.pins == 0]
        for page in victims:
            self._remove(page)
            page.pool.give_back(page.slot)
        return len(victims)
