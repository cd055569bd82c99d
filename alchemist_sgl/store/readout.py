"""Copies of pinned pages for the trainer and for tests: ``gather`` and ``segments``.

Owns the read-side layout of ``ActivationStore.gather``/``segments``: which tensors a range
carries when some of its pages were demoted (store/index.py, Note [Demote before evict]). Must not
import sglang.
"""

from __future__ import annotations

from typing import Sequence

import torch

from alchemist_sgl.records import Coverage
from alchemist_sgl.store.index import Page, PageIndex

Segment = tuple[int, int, "dict[str, torch.Tensor] | None"]


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


def segments(index: PageIndex, coverage: Coverage, layers: int, dtype: torch.dtype
             ) -> list[Segment]:
    """(start, end, tensors or None) tiling [0, length) in order.

    A covered range is cut where the held tensors change (a full page next to a demoted one), so
    each range carries exactly what all its pages hold; missing ranges carry None.
    """
    out: list[Segment] = []
    run: list[tuple[Page, int, int]] = []
    pos = 0

    def flush() -> None:
        if run:
            start, end = run[0][1], run[-1][1] + run[-1][2]
            out.append((start, end, _copy(run, run[0][0].tensors, layers, dtype)))
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
