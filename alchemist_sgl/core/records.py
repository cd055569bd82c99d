"""Value types that cross module boundaries of the recording path (pure, frozen).

Owns the shapes of what capture hands to the store and what the store hands to the trainer.
Must not import torch, sglang or package modules other than ``prefix``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from alchemist_sgl.core.prefix import Namespace

Range = tuple[int, int]  # [start, end) in token positions of one sequence


@dataclass(frozen=True)
class RequestExtend:
    """One request's rows in one extend (prefill) forward.

    ``prompt_tokens``: the request's prompt token ids (all of them, cached prefix included).
    Rows ``[row_offset, row_offset + extend_len)`` of the batch's flattened projection outputs are
    positions ``[prefix_len, prefix_len + extend_len)`` of the sequence. Positions at or past
    ``len(prompt_tokens)`` (decode rows of a MIXED batch) are never recorded.
    """

    rid: str
    namespace: Namespace
    prompt_tokens: Sequence[int]
    prefix_len: int
    extend_len: int
    row_offset: int
    is_recording: bool = True

    @property
    def recorded_range(self) -> Range:
        """Positions this extend records: the computed range clipped to the prompt."""
        end = min(self.prefix_len + self.extend_len, len(self.prompt_tokens))
        return (self.prefix_len, max(self.prefix_len, end))


@dataclass(frozen=True)
class Coverage:
    """Which positions of a token sequence the store can replay, and which must be recomputed.

    ``covered`` and ``missing`` are sorted, disjoint, non-empty [start, end) ranges whose union is
    [0, length_tokens). ``pages`` lists the covered pieces as (key, start, tokens).
    """

    length_tokens: int
    covered: tuple[Range, ...]
    missing: tuple[Range, ...]
    pages: tuple[tuple[bytes, int, int], ...]

    @property
    def covered_tokens(self) -> int:
        return sum(end - start for start, end in self.covered)


def merge_ranges(pieces: Sequence[Range]) -> tuple[Range, ...]:
    """Sorted adjacent/overlapping [start, end) ranges merged; empty ones dropped."""
    merged: list[Range] = []
    for start, end in sorted(p for p in pieces if p[1] > p[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


def complement(ranges: Sequence[Range], length: int) -> tuple[Range, ...]:
    """The parts of [0, length) not in the sorted disjoint ``ranges``."""
    out: list[Range] = []
    pos = 0
    for start, end in ranges:
        if start > pos:
            out.append((pos, start))
        pos = max(pos, end)
    if pos < length:
        out.append((pos, length))
    return tuple(out)
