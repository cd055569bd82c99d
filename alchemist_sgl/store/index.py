"""The page index of the activation store: keys -> slots, LRU order, pins, tiers, demotion, eviction.

Owns which page lives in which slot of which tier, which tensors it still holds, and when it
leaves. Must not import sglang.

Note [Tiers and eviction]: tiers are tried in order device -> host -> dropped. A new page takes a
free device slot; if there is none, the least recently used UNPINNED device page spills to the
host tier (one slot copy, counted in ``spills``) and its slot is reused; with no device tier
(budget 0, the CPU default) it goes to the host tier directly. The last tier makes room as Note
[Demote before evict] says. If every page of every tier is pinned, the new page is dropped (its
tokens are simply not covered): allocation never blocks and never fails. Pages not used for
``ttl_s`` expire. Pinned pages (samples queued for or in training) are never demoted, evicted or
moved, so a pin's coverage stays readable with the tensors it had when pinned.

Note [Demote before evict]: when the last tier is full, the least recently used unpinned full page
is DEMOTED: it keeps only the plan's ``keep_on_demotion`` tensor (``down``: the most FLOPs saved
per byte, core/plan.py) and drops the others, which the trainer recomputes; what it keeps still
replays exactly. Demoted pages are packed ``kept_per_slot`` to a slot (a "container": 9 for
SmolLM2, 11 for Llama-3.2-1B), so each demotion into an open container frees one whole slot. With
no open container, the oldest unpinned full page's own slot becomes one (its kept block moves to
the slot's start) and the next oldest moves in. Only when demotion cannot free a slot (no
unpinned full page, or a single one and no open container) is something evicted: the least
recently used unpinned page; a full one frees its slot, a demoted one its whole container (all
its pages, each counted in ``evictions``; a container holding a pinned page is skipped). Demotion
takes the oldest full pages, so containers sit at the LRU front and old down-only pages go before
newer full ones. A one-tensor plan, or one whose kept block fills more than half a slot, evicts
directly.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from alchemist_sgl.core.prefix import Namespace, PageKey
from alchemist_sgl.store.pool import SlotPool

if TYPE_CHECKING:
    import torch


@dataclass
class Page:
    """One stored page: ``tokens`` valid rows (page_tokens, or fewer for a tail) in ``pool[slot]``.

    ``tail_parent`` is the parent key for a tail page (see prefix.py Note [Tail keys]), else None.
    ``sub`` is None for a full page (every planned tensor) and the block index in its container
    slot for a demoted one (only ``pool.kept_name``).
    """

    key: PageKey
    pool: SlotPool
    slot: int
    tokens: int
    tail_parent: PageKey | None
    last_used_s: float
    namespace: Namespace | None = None
    pins: int = 0
    sub: int | None = None

    @property
    def tensors(self) -> tuple[str, ...]:
        """The tensors this page still holds, in plan order."""
        if self.sub is None:
            return self.pool.plan.tensors
        return (self.pool.kept_name,)  # type: ignore[return-value]

    def view(self, name: str) -> torch.Tensor:
        """[layers, tokens, width] view of tensor ``name`` (KeyError if demoted away)."""
        return self.pool.page_view(self.slot, self.sub, name)[:, :self.tokens]


class PageIndex:
    """Keys to pages over an ordered list of tiers. Single-threaded (the scheduler thread)."""

    def __init__(self, tiers: list[SlotPool], clock: Callable[[], float], ttl_s: float = math.inf
                 ) -> None:
        self.tiers = [t for t in tiers if t.num_slots > 0]
        self._last = self.tiers[-1] if self.tiers else None
        self.can_demote = self._last is not None and self._last.kept_per_slot >= 2
        self._clock = clock
        self._ttl_s = ttl_s
        self._pages: OrderedDict[PageKey, Page] = OrderedDict()  # every page, oldest use first
        self._full: OrderedDict[PageKey, Page] = OrderedDict()   # the full ones, same order
        self._tail_lengths: dict[PageKey, dict[int, int]] = {}  # parent -> {tail tokens: count}
        self._containers: dict[int, list[PageKey | None]] = {}  # last-tier slot -> demoted keys
        self._open: dict[int, None] = {}  # containers with a free block, oldest first
        self.evictions = self.expirations = self.spills = self.demotions = 0

    def __len__(self) -> int:
        return len(self._pages)

    def __contains__(self, key: PageKey) -> bool:
        return key in self._pages

    def pages(self) -> Iterator[Page]:
        return iter(self._pages.values())

    @property
    def demoted_pages(self) -> int:
        return len(self._pages) - len(self._full)

    def get(self, key: PageKey, touch: bool = True) -> Page | None:
        page = self._pages.get(key)
        if page is not None and touch:
            page.last_used_s = self._clock()
            self._pages.move_to_end(key)
            if page.sub is None:
                self._full.move_to_end(key)
        return page

    def tail_lengths(self, parent: PageKey) -> list[int]:
        """Tail lengths stored under ``parent``, longest first."""
        return sorted(self._tail_lengths.get(parent, {}), reverse=True)

    def insert(self, key: PageKey, pool: SlotPool, slot: int, tokens: int,
               tail_parent: PageKey | None, namespace: Namespace | None = None) -> Page:
        """Publishes a fully written slot under ``key`` (which must be new)."""
        assert key not in self._pages
        page = Page(key, pool, slot, tokens, tail_parent, self._clock(), namespace)
        self._pages[key] = self._full[key] = page
        if tail_parent is not None:
            lengths = self._tail_lengths.setdefault(tail_parent, {})
            lengths[tokens] = lengths.get(tokens, 0) + 1
        return page

    def allocate(self) -> tuple[SlotPool, int] | None:
        """A slot for a new page (Note [Tiers and eviction]); None = drop the page."""
        self.expire()
        for depth, pool in enumerate(self.tiers):
            slot = pool.take()
            if slot is None:
                slot = self._reclaim(pool) if pool is self._last else self._spill(pool, depth)
            if slot is not None:
                return pool, slot
        return None

    def _spill(self, pool: SlotPool, depth: int) -> int | None:
        """Frees a slot of an upper tier by moving its LRU unpinned page down (or evicting it)."""
        victim = self._oldest_full(pool)
        if victim is None:
            return None
        slot = victim.slot
        for lower in self.tiers[depth + 1:]:
            dst = lower.take()
            if dst is None and lower is self._last:
                dst = self._reclaim(lower)
            if dst is not None:
                lower.copy_slot(dst, pool, slot)
                victim.pool, victim.slot = lower, dst
                self.spills += 1
                return slot
        self._remove(victim)
        self.evictions += 1
        return slot

    def _reclaim(self, pool: SlotPool) -> int | None:
        """A whole slot of the full last tier: Note [Demote before evict]."""
        if self.can_demote:
            slot = self._demote_one(pool)
            if slot is not None:
                return slot
        return self._evict_lru(pool)

    def _demote_one(self, pool: SlotPool) -> int | None:
        oldest = self._unpinned_full(pool, 2)
        if not oldest or (not self._open and len(oldest) < 2):
            return None
        if not self._open:  # the oldest page's slot becomes a container
            first = oldest.pop(0)
            self._containers[first.slot] = [None] * pool.kept_per_slot
            self._open[first.slot] = None
            self._move_kept(first, first.slot, 0)
        victim = oldest[0]
        freed = victim.slot
        target = next(iter(self._open))
        self._move_kept(victim, target, self._containers[target].index(None))
        return freed

    def _move_kept(self, page: Page, slot: int, sub: int) -> None:
        pool, name = page.pool, page.pool.kept_name
        assert name is not None
        src = pool.page_view(page.slot, None, name)
        if slot == page.slot:  # the page's own slot becomes the container: blocks may overlap
            src = src.clone()
        pool.page_view(slot, sub, name).copy_(src)
        blocks = self._containers[slot]
        blocks[sub] = page.key
        if None not in blocks:
            self._open.pop(slot, None)
        page.slot, page.sub = slot, sub
        del self._full[page.key]
        self.demotions += 1

    def _evict_lru(self, pool: SlotPool) -> int | None:
        """Evicts the least recently used unpinned page of ``pool``: a full one frees its slot, a
        demoted one frees its whole container (every page in it; skipped if one is pinned)."""
        for page in self._pages.values():
            if page.pins or page.pool is not pool:
                continue
            if page.sub is None:
                self._remove(page)
                self.evictions += 1
                return page.slot
            slot = page.slot
            keys = [k for k in self._containers[slot] if k is not None]
            if any(self._pages[k].pins for k in keys):
                continue
            for k in keys:
                self._remove(self._pages[k])
            self.evictions += len(keys)
            del self._containers[slot]
            self._open.pop(slot, None)
            return slot
        return None

    def _unpinned_full(self, pool: SlotPool, limit: int) -> list[Page]:
        found = []
        for page in self._full.values():
            if page.pins == 0 and page.pool is pool:
                found.append(page)
                if len(found) == limit:
                    break
        return found

    def _oldest_full(self, pool: SlotPool) -> Page | None:
        found = self._unpinned_full(pool, 1)
        return found[0] if found else None

    def _remove(self, page: Page) -> None:
        """Forgets ``page``; its storage is the caller's (``free`` gives it back)."""
        del self._pages[page.key]
        self._full.pop(page.key, None)
        if page.tail_parent is not None:
            lengths = self._tail_lengths[page.tail_parent]
            lengths[page.tokens] -= 1
            if lengths[page.tokens] == 0:
                del lengths[page.tokens]
            if not lengths:
                del self._tail_lengths[page.tail_parent]

    def free(self, page: Page) -> None:
        """Forgets ``page`` and gives its storage back (a demoted page: its block of a container)."""
        self._remove(page)
        if page.sub is None:
            page.pool.give_back(page.slot)
            return
        blocks = self._containers[page.slot]
        blocks[page.sub] = None
        if any(k is not None for k in blocks):
            self._open.setdefault(page.slot, None)
        else:
            del self._containers[page.slot]
            self._open.pop(page.slot, None)
            page.pool.give_back(page.slot)

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
            self.free(page)
            self.expirations += 1

    def drop_unpinned(self) -> int:
        """Frees every unpinned page (e.g. after a radix flush in an A/B run); returns the count."""
        victims = [p for p in self._pages.values() if p.pins == 0]
        for page in victims:
            self.free(page)
        return len(victims)
