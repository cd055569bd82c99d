"""ActivationStore: recorded projection outputs, deduplicated by chained page keys.

Owns recorded activations between the prefill that produced them and the training step that
replays them. Must not import sglang; imports torch and ``core`` (``prefix``, ``records``, ``plan``).

Note [Page alignment]: a page is ``page_tokens`` (<= 16) consecutive prompt positions starting at
a multiple of ``page_tokens``. The server runs SGLang with ``--page-size`` equal to
``store.page_tokens`` (works on CPU with torch_native, docs/recording-and-replay.md "The activation store"), so a radix
hit ends on a page boundary and every extend, chunked or not, starts on one: each extend writes
whole pages, except the prompt's last partial page, stored as a tail (prefix.py Note [Tail keys]) so
that no computed token is lost. A chunk that ends mid-page (possible only when SGLang's page size is
smaller than the store's) leaves the page open in the request's writer and the next chunk of the
same request completes it. An extend that starts mid-page without such an open page (a radix hit
not on a store page boundary) cannot complete a keyed page: those rows up to the next boundary are
skipped and counted in ``unaligned_tokens_skipped``; they are recomputed by the trainer.

Note [Stitching]: the radix cache never recomputes a cached prefix, so a request's recording is
made of pages written by earlier requests plus its own. Keys are content addresses of the whole
prefix, so ``coverage(tokens, namespace)`` finds both kinds alike; positions with no page (decoded
tokens of an earlier turn, evicted pages, skipped rows) are holes, reported in ``missing``. With
``dedup=False`` (``store.dedup: false``) each request's chain has its own root (roots.py): nothing
is shared or stitched, and a prefix the radix cache served is a hole of that request's recording.

Note [References]: only a ``Pin`` (a sample queued for or in training) keeps pages from eviction.
A completion awaiting feedback holds a weak reference: its (token ids, namespace) pair, upgraded
with ``pin`` when the sample is queued; what was evicted by then is recomputed.

Note [Store lifetime]: a recording made under version v replays exactly only for a trainer at v
(approximately up to ``train.max_version_lag`` versions later), so at each publish the online
loop calls ``release_namespaces`` with "is this version still within the lag of the new serving
version": pages of the others are freed at once (pinned ones at their last ``unpin``) and pages
of them still being written are never published. Under pressure inside that window the index
demotes before it evicts (index.py, Note [Demote before evict]).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from alchemist_sgl.core.prefix import Namespace, PageKey, chain_keys, page_key, tail_key
from alchemist_sgl.core.plan import RecordPlan
from alchemist_sgl.core.records import Coverage, RequestExtend, complement, merge_ranges
from alchemist_sgl.store import readout
from alchemist_sgl.store.index import Page, PageIndex
from alchemist_sgl.store.pool import SlotPool
from alchemist_sgl.store.open_pages import BatchWrite, OpenPage, Writer, scratch_rows
from alchemist_sgl.store.roots import ChainRoots

_PerPool = dict[int, tuple[SlotPool, list[int], list[int], list[int]]]  # id(pool) -> (pool, src, slots, rows)


@dataclass(frozen=True)
class Pin:
    """A strong reference to the covered pages of one sequence; release with ``unpin``."""

    coverage: Coverage
    namespace: Namespace
    serial: int


class ActivationStore:
    """Recorded per-layer projection outputs of prefilled prompt tokens, keyed by page.

    Write path (scheduler thread, during an extend forward): ``open_batch(extends)`` once before the
    forward, ``write(batch, name, layer, output)`` for each planned tensor and layer with the
    batch's flattened output ``[rows, width]`` (copied at once; the caller may reuse ``output``),
    ``close_batch(batch)`` after the forward publishes completed pages (``discard_batch(batch)``
    instead when the forward did not complete). ``abort(rid)`` forgets a
    request whose prefill will not continue. Read path: ``coverage``, ``pin``/``unpin``,
    ``gather``. Not thread-safe; every call comes from the scheduler thread.
    """

    def __init__(self, plan: RecordPlan, host_bytes: int, device_bytes: int = 0, *,
                 dtype: torch.dtype, device: torch.device | str = "cpu",
                 clock: Callable[[], float] = time.monotonic,
                 timer: Callable[[], float] = time.perf_counter, ttl_s: float = math.inf,
                 writer_idle_s: float = 600.0, dedup: bool = True) -> None:
        self.plan = plan
        self.page_tokens = plan.page_tokens
        self._device_pool = SlotPool(plan, device_bytes, dtype, device, "device")
        self._host_pool = SlotPool(plan, host_bytes, dtype, "cpu", "host")
        self._index = PageIndex([self._device_pool, self._host_pool], clock, ttl_s)
        self._roots = ChainRoots(dedup, self._device_pool.num_slots + self._host_pool.num_slots)
        self._clock, self._timer = clock, timer
        self._writer_idle_s = writer_idle_s
        self._writers: dict[str, Writer] = {}
        self._scratch: dict[str, torch.Tensor] = {}
        self._pin_serial = 0
        self._pinned: set[int] = set()
        self._released: set[Namespace] = set()  # Note [Store lifetime]
        self.released_pages = 0
        self._dtype = dtype
        self.hits = self.misses = 0
        self.bytes_deduplicated = 0
        self.dropped_tokens = 0
        self.unaligned_tokens_skipped = 0
        self.bytes_recorded_total = 0
        self._record_s_total = 0.0
        self._record_batches = 0

    # ---------------------------------------------------------------- write path
    def open_batch(self, extends: Sequence[RequestExtend]) -> BatchWrite:
        """Routes each recording request's rows to slots; allocates (and may evict) slots."""
        start_s = self._timer()
        self._forget_idle_writers()
        per_pool: _PerPool = {}
        batch = BatchWrite([], [], [])
        for ext in extends:
            lo, hi = ext.recorded_range
            if not ext.is_recording or hi <= lo:
                continue
            writer = self._writer_for(ext)
            batch.writers.append(writer)
            self._route(writer, ext, lo, hi, per_pool, batch)
            if hi >= len(ext.prompt_tokens):
                batch.finished.append(writer)
        for pool, src, slots, rows in per_pool.values():
            src_t = torch.tensor(src, dtype=torch.long)
            contiguous = slice(src[0], src[-1] + 1) if src[-1] - src[0] + 1 == len(src) and \
                all(b == a + 1 for a, b in zip(src, src[1:])) else None
            batch.routes.append((pool, src_t, torch.tensor(slots, dtype=torch.long),
                                 torch.tensor(rows, dtype=torch.long), contiguous))
        batch.elapsed_s += self._timer() - start_s
        return batch

    def write(self, batch: BatchWrite, name: str, layer: int, output: torch.Tensor) -> None:
        """Copies the routed rows of ``output`` [rows, width] (one tensor, one layer) into slots."""
        start_s = self._timer()
        for pool, src, slots, rows, contiguous in batch.routes:
            if contiguous is not None:
                values = output[contiguous]
            else:
                values = scratch_rows(self._scratch, name, output, src)
            if values.device != pool.buffer.device:
                # Device output into the host tier: a synchronous copy (host sync) with a
                # temporary; a pinned staging ring with its own stream is future work.
                values = values.to(pool.buffer.device)
            pool.tensor_views[name][:, layer].index_put_((slots, rows), values)
        batch.elapsed_s += self._timer() - start_s

    def close_batch(self, batch: BatchWrite) -> None:
        """Publishes pages completed by this forward; ends finished requests' writers."""
        start_s = self._timer()
        bpt = self.plan.bytes_per_token
        for writer, page in batch.completed:
            if page.target is None:
                continue
            pool, slot = page.target
            if writer.namespace in self._released:  # Note [Store lifetime]
                self._index.release_slot(pool, slot)
                self.released_pages += 1
            elif page.key in self._index:  # the same new page written twice in one batch
                self._index.release_slot(pool, slot)
                self.bytes_deduplicated += page.rows * bpt
            else:
                self._index.insert(page.key, pool, slot, page.rows, page.tail_parent,
                                   writer.namespace)
                self.bytes_recorded_total += page.rows * bpt
        for writer in batch.finished:
            self._close_writer(writer)
        batch.elapsed_s += self._timer() - start_s
        self._record_s_total += batch.elapsed_s
        self._record_batches += 1

    def discard_batch(self, batch: BatchWrite) -> None:
        """Drops a forward whose writes may be incomplete: nothing it touched is published.

        Slots of its completed pages go back to the pool and the writers of its requests are
        closed (their open pages too); later extends of those requests start new writers.
        """
        for _, page in batch.completed:
            if page.target is not None:
                self._index.release_slot(*page.target)
        for writer in batch.writers:
            self._close_writer(writer)
        batch.completed.clear()
        batch.finished.clear()

    def abort(self, rid: str) -> None:
        """Forgets ``rid``'s open page, if any (its prefill stopped before the prompt's end)."""
        writer = self._writers.get(rid)
        if writer is not None:
            self._close_writer(writer)

    def _writer_for(self, ext: RequestExtend) -> Writer:
        writer = self._writers.get(ext.rid)
        if writer is None or writer.namespace != ext.namespace:
            if writer is not None:
                self._close_writer(writer)
            root = self._roots.for_writer(ext.namespace, ext.rid, ext.prompt_tokens)
            writer = Writer(ext.rid, ext.namespace, ext.prompt_tokens, root)
            self._writers[ext.rid] = writer
            if ext.prefix_len > 0:  # Note [Stitching]: prefix pages reused, not stored again
                reused = self.coverage(ext.prompt_tokens[:ext.prefix_len], ext.namespace,
                                       count_hits=False, rid=ext.rid)
                self.bytes_deduplicated += reused.covered_tokens * self.plan.bytes_per_token
        writer.last_seen_s = self._clock()
        return writer

    def _route(self, writer: Writer, ext: RequestExtend, lo: int, hi: int,
               per_pool: _PerPool, batch: BatchWrite) -> None:
        size, n_prompt = self.page_tokens, len(writer.tokens)
        pos = lo
        while pos < hi:
            index = pos // size
            page_lo, page_hi = index * size, min(index * size + size, n_prompt)
            n = min(hi, page_hi) - pos
            page = writer.open
            if page is None or page.index != index or page.rows != pos - page_lo:
                self._drop_open(writer)
                if pos != page_lo:  # Note [Page alignment]
                    self.unaligned_tokens_skipped += n
                    pos += n
                    continue
                page = writer.open = self._new_page(writer, index, page_lo, page_hi)
            if page.target is not None:
                pool, slot = page.target
                entry = per_pool.setdefault(id(pool), (pool, [], [], []))
                first = ext.row_offset + pos - ext.prefix_len
                entry[1].extend(range(first, first + n))
                entry[2].extend([slot] * n)
                entry[3].extend(range(pos - page_lo, pos - page_lo + n))
            elif page.is_duplicate:
                self.bytes_deduplicated += n * self.plan.bytes_per_token
            else:
                self.dropped_tokens += n
            page.rows += n
            if page.rows == page_hi - page_lo:
                batch.completed.append((writer, page))
                writer.open = None
            pos += n

    def _new_page(self, writer: Writer, index: int, page_lo: int, page_hi: int) -> OpenPage:
        size = self.page_tokens
        while len(writer.keys) < index:  # chain keys of the full pages before this one
            parent = writer.keys[-1] if writer.keys else writer.root
            k = len(writer.keys)
            writer.keys.append(page_key(parent, writer.tokens[k * size:(k + 1) * size]))
        parent = writer.keys[index - 1] if index > 0 else writer.root
        if page_hi - page_lo == size:
            key, tail_parent = page_key(parent, writer.tokens[page_lo:page_hi]), None
        else:
            key, tail_parent = tail_key(parent, writer.tokens[page_lo:page_hi]), parent
        if self._index.get(key) is not None:
            return OpenPage(index, key, tail_parent, None, is_duplicate=True)
        return OpenPage(index, key, tail_parent, self._index.allocate())

    def _drop_open(self, writer: Writer) -> None:
        page = writer.open
        writer.open = None
        if page is not None and page.target is not None:
            self._index.release_slot(*page.target)

    def _close_writer(self, writer: Writer) -> None:
        self._drop_open(writer)
        self._writers.pop(writer.rid, None)

    def _forget_idle_writers(self) -> None:
        deadline = self._clock() - self._writer_idle_s
        for writer in [w for w in self._writers.values() if w.last_seen_s < deadline]:
            self._close_writer(writer)

    # ---------------------------------------------------------------- read path
    def coverage(self, tokens: Sequence[int], namespace: Namespace, count_hits: bool = True,
                 rid: str | None = None) -> Coverage:
        """Positions of ``tokens`` with recorded pages under ``namespace`` (Note [Stitching]);
        dedup off: in ``rid``'s recording, else in the latest of exactly ``tokens`` (roots.py)."""
        size, n = self.page_tokens, len(tokens)
        root = self._roots.for_reader(namespace, tokens, rid)
        pieces = self._pieces(tokens, namespace, root) if root is not None else []
        if count_hits:
            self.hits += len(pieces)
            self.misses += -(-n // size) - len(pieces)
        covered = merge_ranges([(lo, lo + length) for _, lo, length in pieces])
        return Coverage(n, covered, complement(covered, n), tuple(pieces))

    def _pieces(self, tokens: Sequence[int], namespace: Namespace, root: PageKey
                ) -> list[tuple[PageKey, int, int]]:
        """(key, start, tokens) of the stored pages of ``tokens``, its chain rooted at ``root``."""
        size, n = self.page_tokens, len(tokens)
        keys = chain_keys(tokens, size, namespace, root=root)
        pieces: list[tuple[PageKey, int, int]] = []
        for index in range(-(-n // size)):
            lo, hi = index * size, min(index * size + size, n)
            parent = keys[index - 1] if index > 0 else root
            if hi - lo == size and self._index.get(keys[index]) is not None:
                pieces.append((keys[index], lo, size))
                continue
            for length in self._index.tail_lengths(parent):
                if length <= hi - lo and length < size:
                    key = tail_key(parent, tokens[lo:lo + length])
                    if self._index.get(key) is not None:
                        pieces.append((key, lo, length))
                        break
        return pieces

    def pin(self, tokens: Sequence[int], namespace: Namespace, rid: str | None = None) -> Pin:
        """Strong reference on the pages covering ``tokens`` now (Note [References], coverage)."""
        coverage = self.coverage(tokens, namespace, rid=rid)
        for key, _, _ in coverage.pages:
            self._pinned_page(key).pins += 1
        self._pin_serial += 1
        self._pinned.add(self._pin_serial)
        return Pin(coverage, namespace, self._pin_serial)

    def unpin(self, pin: Pin) -> None:
        if pin.serial not in self._pinned:
            raise ValueError(f"pin {pin.serial} was already released")
        self._pinned.discard(pin.serial)
        for key, _, _ in pin.coverage.pages:
            page = self._pinned_page(key)
            page.pins -= 1
            if page.pins == 0 and page.namespace in self._released:
                self._index.free(page)
                self.released_pages += 1

    def _pinned_page(self, key: PageKey) -> Page:
        page = self._index.get(key, touch=False)
        assert page is not None  # a covered (or pinned) page is held by the index until unpinned
        return page

    def gather(self, pin: Pin) -> dict[str, torch.Tensor]:
        """Copies of the pinned pages: per tensor [layers, covered_tokens, width] (readout.py:
        every planned tensor, or only the kept one when a pinned page was demoted).

        Covered positions appear in increasing order (``pin.coverage.covered`` says which).
        """
        return readout.gather(self._index, pin.coverage, self.plan.shape.layers, self._dtype)

    def segments(self, pin: Pin, *, is_lazy: bool = False) -> list[readout.Segment]:
        """(start, end, tensors or None) tiling [0, length) in order: the shape of the trainer's
        ``PromptSegment`` list (train/samples.py). Covered ranges carry per tensor their pages
        hold [layers, end - start, width] (cut where demotion changed that); missing ranges
        (to recompute) carry None. ``is_lazy``: ``readout.PagedRows`` read one layer at a time
        by the trainer, valid until ``unpin`` (readout.py, Note [Per-layer read-out]); else copies.
        """
        return readout.segments(self._index, pin.coverage, self.plan.shape.layers, self._dtype,
                                is_lazy)

    def release_namespaces(self, is_live: Callable[[Namespace], bool]) -> int:
        """Frees the pages of every namespace ``is_live`` rejects (Note [Store lifetime]); returns
        the count. A released namespace stays released."""
        verdict: dict[Namespace, bool] = {}
        freed = 0
        for page in list(self._index.pages()):
            ns = page.namespace
            if ns is None or ns in self._released:
                continue
            if ns not in verdict:
                verdict[ns] = bool(is_live(ns))
            if not verdict[ns] and page.pins == 0:
                self._index.free(page)
                freed += 1
        self._released.update(ns for ns, live in verdict.items() if not live)
        self._released.update(w.namespace for w in self._writers.values()
                              if w.namespace not in verdict and not is_live(w.namespace))
        self.released_pages += freed
        return freed

    def drop_unpinned(self) -> int:
        """Frees every unpinned page (A/B runs flush between arms); returns the count."""
        return self._index.drop_unpinned()

    # ---------------------------------------------------------------- metrics
    def status(self) -> dict[str, float | int]:
        """The ``store`` entry of ``/alchemist/status`` (docs/api.md) plus a few extras.

        bytes_stored: bytes of the tensors held now (a demoted page counts its kept tensor only;
        ``bytes_recorded_total``: ever published, full). device_bytes/host_bytes: slot memory held
        per tier (a tail page occupies a whole slot). bytes_deduplicated: bytes NOT stored again
        because their page already existed (cumulative). hits: pages found by coverage/pin
        lookups. evictions: pages dropped for space; demotions: pages that dropped all but the
        kept tensor under pressure (index.py, Note [Demote before evict]); demoted_pages: such
        pages held now; spills: device pages moved to the host tier; released_pages: pages freed
        because their version can no longer replay (Note [Store lifetime]). record_ms_mean: mean
        recording time per extend forward with recording.
        """
        widths, layers, dtype_bytes = self.plan.widths, self.plan.shape.layers, self.plan.shape.dtype_bytes
        stored = sum(p.tokens * layers * dtype_bytes * sum(widths[n] for n in p.tensors)
                     for p in self._index.pages())
        return {
            "bytes_stored": stored, "bytes_deduplicated": self.bytes_deduplicated,
            "pages": len(self._index), "hits": self.hits, "evictions": self._index.evictions,
            "record_ms_mean": (1000.0 * self._record_s_total / self._record_batches
                               if self._record_batches else 0.0),
            "device_bytes": self._device_pool.used_bytes, "host_bytes": self._host_pool.used_bytes,
            "misses": self.misses, "bytes_recorded_total": self.bytes_recorded_total,
            "expirations": self._index.expirations, "demotions": self._index.demotions,
            "demoted_pages": self._index.demoted_pages, "spills": self._index.spills,
            "released_pages": self.released_pages, "dropped_tokens": self.dropped_tokens,
            "unaligned_tokens_skipped": self.unaligned_tokens_skipped,
            "host_capacity_bytes": self._host_pool.num_slots * self._host_pool.slot_bytes,
            "open_writers": len(self._writers),
        }
