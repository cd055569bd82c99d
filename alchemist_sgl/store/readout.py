"""Read-outs of pinned pages for the trainer and for tests: ``gather``, ``segments``, ``PagedRows``.

Owns the read-side layout of ``ActivationStore.gather``/``segments``: which tensors a range
carries when some of its pages were demoted (store/index.py, Note [Demote before evict]), and the
per-layer read-out ``PagedRows``. Must not import sglang.

Note [Per-layer read-out]: ``segments(..., is_lazy=True)`` copies nothing up front; each covered
range carries per tensor a ``PagedRows`` [layers, tokens, width] that the trainer reads ONE layer
at a time (``copy_layer``) straight into the rows of that layer's projection output. A copied
read-out instead allocates [layers, tokens, width] per tensor for the whole step (250 MB per
400-token SmolLM2 prompt in fp32) that is first touched by the copy (page faults) and copied again
into the projection output: profiled on a prompt-heavy step, that double copy made replay slower
than recompute. Pinned pages are never demoted, evicted or moved (index.py, Note [Tiers and
eviction]), so a ``PagedRows`` reads the same values as a copy made at pin time, as long as it is
read before ``unpin``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from alchemist_sgl.core.records import Coverage
from alchemist_sgl.store.index import Page, PageIndex

# Profiler region of every read-out of recorded rows (train/replay_rows.py has the same name).
READOUT_REGION = "alchemist::replay_readout"
Segment = tuple[int, int, "dict[str, torch.Tensor] | dict[str, PagedRows] | None"]
Piece = tuple[Page, int, int]  # (page, first row in the page, rows)


class PagedRows:
    """Tensor ``name`` [layers, tokens, width] of a run of pinned pages, read a layer at a time
    (Note [Per-layer read-out]). Duck-types the trainer's recording tensors (train/samples.py):
    ``shape``, ``dtype``, ``device``, ``copy_layer``, ``rows`` and indexing by layer (a new
    [tokens, width] tensor)."""

    def __init__(self, pieces: Sequence[Piece], name: str, layers: int, dtype: torch.dtype) -> None:
        self.pieces, self.name, self.dtype = tuple(pieces), name, dtype
        pool = self.pieces[0][0].pool
        tokens = sum(n for _, _, n in self.pieces)
        self.shape = torch.Size((layers, tokens, pool.plan.widths[name]))
        self.device = pool.buffer.device
        size = pool.plan.page_tokens
        self._slots: torch.Tensor | None = None  # set when every piece but the last is a full page
        if all(p.pool is pool and p.sub is None and lo == 0 for p, lo, _ in self.pieces) and \
                all(n == size for _, _, n in self.pieces[:-1]) and len(self.pieces) > 1:
            self._slots = torch.tensor([p.slot for p, _, _ in self.pieces[:-1]], dtype=torch.long,
                                       device=self.device)

    @property
    def is_indexed(self) -> bool:
        """Whether a layer is read with one ``index_select`` (every page but the last whole and
        full, one pool) rather than one copy per page."""
        return self._slots is not None

    def copy_layer(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """Copies layer ``layer`` [tokens, width] into ``out`` (any device) and returns it."""
        if out.shape != self.shape[1:]:
            raise ValueError(f"read-out of {tuple(self.shape[1:])} into {tuple(out.shape)}")
        if out.device != self.device or (self._slots is not None and not out.is_contiguous()):
            return out.copy_(self[layer])  # one read-out, then one copy
        with torch.profiler.record_function(READOUT_REGION):
            return self._read(layer, out)

    def _read(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        pos = 0
        pieces = self.pieces
        if self._slots is not None:
            pool, size = pieces[0][0].pool, pieces[0][0].pool.plan.page_tokens
            pos = self._slots.numel() * size
            torch.index_select(pool.tensor_views[self.name][:, layer], 0, self._slots,
                               out=out[:pos].view(-1, size, self.shape[2]))
            pieces = pieces[-1:]
        for page, lo, n in pieces:
            out[pos:pos + n].copy_(page.view(self.name)[layer, lo:lo + n])
            pos += n
        return out

    def __getitem__(self, layer: int) -> torch.Tensor:
        """Layer ``layer`` as a new [tokens, width] tensor on the pages' device."""
        if not isinstance(layer, int):
            raise TypeError("PagedRows reads one layer by an int index; use rows() for row ranges")
        return self.copy_layer(layer, torch.empty(self.shape[1:], dtype=self.dtype,
                                                  device=self.device))

    def rows(self, lo: int, hi: int) -> "PagedRows":
        """Rows [lo, hi) of every layer, as another ``PagedRows``."""
        if not 0 <= lo < hi <= self.shape[1]:
            raise ValueError(f"rows [{lo}, {hi}) outside [0, {self.shape[1]})")
        out, pos = [], 0
        for page, first, n in self.pieces:
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                out.append((page, first + a - pos, b - a))
            pos += n
        return PagedRows(out, self.name, self.shape[0], self.dtype)

    def materialize(self) -> torch.Tensor:
        """Every layer as one new [layers, tokens, width] tensor (what a copied read-out gives)."""
        dst = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        for layer in range(self.shape[0]):
            self.copy_layer(layer, dst[layer])
        return dst


def _pages(index: PageIndex, coverage: Coverage) -> list[tuple[Page, int, int]]:
    return [(index.get(key, touch=False), lo, length)  # type: ignore[misc]
            for key, lo, length in coverage.pages]


def _copy(pages: Sequence[tuple[Page, int, int]], names: Sequence[str], layers: int,
          dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tokens = sum(length for _, _, length in pages)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        width = pages[0][0].pool.plan.widths[name]
        dst = torch.empty((layers, tokens, width), dtype=dtype)
        pos = 0
        for page, _, length in pages:
            dst[:, pos:pos + length].copy_(page.view(name)[:, :length])
            pos += length
        out[name] = dst
    return out


def gather(index: PageIndex, coverage: Coverage, layers: int, dtype: torch.dtype
           ) -> dict[str, torch.Tensor]:
    """Per tensor that EVERY covered page holds: [layers, covered_tokens, width], in order.

    With no demoted page among them that is every planned tensor; a demoted page limits it to the
    kept one (``segments`` gives each range what its own pages hold).
    """
    pages = _pages(index, coverage)
    if not pages:
        return {}
    names = [n for n in pages[0][0].pool.plan.tensors
             if all(n in page.tensors for page, _, _ in pages)]
    return _copy(pages, names, layers, dtype)


def segments(index: PageIndex, coverage: Coverage, layers: int, dtype: torch.dtype,
             is_lazy: bool = False) -> list[Segment]:
    """(start, end, tensors or None) tiling [0, length) in order.

    A covered range is cut where the held tensors change (a full page next to a demoted one), so
    each range carries exactly what all its pages hold; missing ranges carry None. ``is_lazy``:
    ``PagedRows`` instead of copies (Note [Per-layer read-out]).
    """
    out: list[Segment] = []
    run: list[tuple[Page, int, int]] = []
    pos = 0

    def flush() -> None:
        if run:
            start, end = run[0][1], run[-1][1] + run[-1][2]
            names = run[0][0].tensors
            tensors = ({n: PagedRows([(p, 0, length) for p, _, length in run], n, layers, dtype)
                        for n in names} if is_lazy else _copy(run, names, layers, dtype))
            out.append((start, end, tensors))
            run.clear()

    for page, lo, length in _pages(index, coverage):
        if lo > pos or (run and page.tensors != run[0][0].tensors):
            flush()
        if lo > pos:
            out.append((pos, lo, None))
        run.append((page, lo, length))
        pos = lo + length
    flush()
    if pos < coverage.length_tokens:
        out.append((pos, coverage.length_tokens, None))
    return out
