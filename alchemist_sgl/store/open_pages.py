"""The write-side state of the activation store: open pages, per-request writers, batch routes.

Owns the value types that carry a recording from ``open_batch`` to ``close_batch`` (and across the
chunks of one prompt). Must not import sglang.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from alchemist_sgl.core.prefix import Namespace, PageKey
from alchemist_sgl.store.pool import SlotPool


@dataclass
class OpenPage:
    index: int            # page number in the sequence
    key: PageKey
    tail_parent: PageKey | None
    target: tuple[SlotPool, int] | None  # None: rows are not written (duplicate or dropped)
    rows: int = 0         # rows filled so far
    is_duplicate: bool = False


@dataclass
class Writer:
    """Per-request recording state across the extends of one prompt (chunked prefill)."""

    rid: str
    namespace: Namespace
    tokens: Sequence[int]
    root: PageKey  # where its key chain starts (roots.py)
    keys: list[PageKey] = field(default_factory=list)  # chain keys of full pages, grown lazily
    open: OpenPage | None = None
    last_seen_s: float = 0.0


@dataclass
class BatchWrite:
    """The row routing of one extend forward, from ``open_batch`` to ``close_batch``.

    Per tier: ``src`` rows of the batch's flattened outputs go to (``slot``, ``row``) of the tier.
    """

    routes: list[tuple[SlotPool, torch.Tensor, torch.Tensor, torch.Tensor, slice | None]]
    completed: list[tuple[Writer, OpenPage]]
    finished: list[Writer]
    elapsed_s: float = 0.0
    writers: list[Writer] = field(default_factory=list)


def scratch_rows(scratch: dict[str, torch.Tensor], name: str, output: torch.Tensor,
                 src: torch.Tensor) -> torch.Tensor:
    """Rows ``src`` of ``output``, gathered into a reused per-tensor buffer of ``scratch``."""
    buffer = scratch.get(name)
    if buffer is None or buffer.shape[0] < src.numel() or buffer.dtype != output.dtype \
            or buffer.shape[1:] != output.shape[1:] or buffer.device != output.device:
        buffer = torch.empty((max(src.numel(), 256), *output.shape[1:]), dtype=output.dtype,
                             device=output.device)
        scratch[name] = buffer
    out = buffer[:src.numel()]
    torch.index_select(output, 0, src.to(output.device), out=out)
    return out
