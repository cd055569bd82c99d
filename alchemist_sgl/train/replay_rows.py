"""The recorded rows one decoder layer replays, read out of a planned sample's recordings.

Owns ``layer_recordings`` (per projection: nothing, row ranges for ops.py's
``row_replayed_linear``, or one [n, d] prefix tensor for the compiled layer; layer.py, Note [Joint
layer]) and ``READOUT_REGION``, the profiler region of a read-out (store/readout.py uses the same
name). Imports only torch and lower train/ modules.
"""

from __future__ import annotations

import functools

import torch

from alchemist_sgl.train.ops import RowRanges, RowSource
from alchemist_sgl.train.samples import LayerRows, PlannedSample
from alchemist_sgl.train.spec import PROJECTIONS

# Profiler region of a read-out of recorded rows (store/readout.py has the same name).
READOUT_REGION = "alchemist::replay_readout"
# One projection's recorded rows of a layer: a [n, d] prefix tensor (compiled), row ranges
# (eager, ops.py's ``row_replayed_linear``) or None (nothing recorded).
LayerRecording = torch.Tensor | RowRanges | None
_Ranges = list[tuple[int, int, "torch.Tensor | LayerRows | None"]]


def layer_recordings(planned: PlannedSample, layer: int, device: torch.device,
                     is_compiled: bool = False) -> tuple[tuple[LayerRecording, ...], bool]:
    """Per projection (PROJECTIONS order): None or the recorded rows of ``layer`` (Note [Joint
    layer]); and whether every recording is a prefix. Eager (``is_compiled`` False): a ranges list
    for ``row_replayed_linear`` whose recorded entries fill the output's rows in place (one copy,
    straight from the store's pages for a ``PagedRows``: store/readout.py, Note [Per-layer
    read-out]). Compiled: a [n, d] prefix tensor where every recording is a prefix."""
    out: list[_Ranges | None] = []
    is_prefix_only = True
    for name in PROJECTIONS:
        ranges: _Ranges = []
        recorded = 0
        for seg in planned.segments:
            rec = seg.replay.get(name)
            ranges.append((seg.start, seg.end, rec))
            if rec is not None:
                is_prefix_only = is_prefix_only and seg.start == recorded
                recorded += seg.end - seg.start
        out.append(ranges if recorded else None)
    if is_compiled and is_prefix_only:
        return tuple(None if r is None else _prefix_rows(r, layer, device) for r in out), True
    return tuple(None if r is None else _merge([(a, b, None if rec is None else _filler(rec, layer))
                                                for a, b, rec in r]) for r in out), is_prefix_only


def _merge(ranges: RowRanges) -> RowRanges:
    merged: RowRanges = []
    for start, end, rec in ranges:
        if rec is None and merged and merged[-1][2] is None:
            merged[-1] = (merged[-1][0], end, None)
        else:
            merged.append((start, end, rec))
    return merged


def _filler(rec: torch.Tensor | LayerRows, layer: int) -> RowSource:
    """The recording's rows of ``layer``: a tensor view, or a function that copies them into the
    output rows it is given (a ``PagedRows``)."""
    if isinstance(rec, torch.Tensor):
        return rec[layer]
    return functools.partial(rec.copy_layer, layer)


def _prefix_rows(ranges: _Ranges, layer: int, device: torch.device) -> torch.Tensor:
    """The recorded prefix rows [n, d] of ``layer`` as one tensor on ``device``."""
    recs = [(a, b, rec) for a, b, rec in ranges if rec is not None]
    first = recs[0][2]
    if len(recs) == 1 and isinstance(first, torch.Tensor):
        return first[layer].to(device, non_blocking=True)
    out = torch.empty((recs[-1][1], first.shape[2]), dtype=first.dtype, device=device)
    with torch.profiler.record_function(READOUT_REGION):
        for a, b, rec in recs:
            fill = _filler(rec, layer)
            if callable(fill):
                fill(out[a:b])
            elif fill is not None:
                out[a:b].copy_(fill, non_blocking=True)
    return out
