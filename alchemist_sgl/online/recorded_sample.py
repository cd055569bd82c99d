"""A trainer ``Sample`` from a pending sample and its recording's segments.

Owns ``build_sample``: the segments become projection recordings (samples.py), and under the
``graph`` record plan a prompt whose rows [0, P - 1) are all held at graph level also gets its
``PromptGraph``, rebuilt from the stored rows (train/graph_rows.py). Imports the trainer's value
types and the rebuild; never the store or sglang.

Note [Graph samples]: a graph plan page holds the four projections, ``attn`` and ``lse``; a
demoted one only ``down`` (core/plan.py, Note [Graph plan]). The store's segments are cut where
the held tensors change, so the prompt qualifies when its first segment starts at 0, holds every
graph tensor and reaches row P - 1 (graph_backward.py, Note [Prompt and response rows]: the last
prompt row runs with the response). Its rows [0, P - 1) are then rebuilt into the sample's
``PromptGraph`` here, when the sample is built (one read of those rows and elementwise ops, on
the trainer's device), labelled with the recording's version, unless the trainer's replay is
off; the trainer's planner decides whether to use it (exact gradients, no LoRA dropout, lag within
bound; samples.py). Otherwise, and for the projection segments in any case, ``attn`` and ``lse``
are left out and the sample replays its projections as before.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from alchemist_sgl.online.intake import PendingSample
from alchemist_sgl.online.loop_types import RecordedSegment
from alchemist_sgl.train import PromptSegment, Recording, ReplayTrainer, Sample
from alchemist_sgl.train.graph_rows import GRAPH_ROW_NAMES, rebuild_prompt_graph
from alchemist_sgl.train.samples import LayerRows, PromptGraph
from alchemist_sgl.train.spec import PROJECTIONS

_Tensors = Mapping[str, torch.Tensor] | Mapping[str, LayerRows]


def build_sample(p: PendingSample, segments: Sequence[RecordedSegment], version: int,
                 trainer: ReplayTrainer) -> Sample:
    """``p`` as a trainer ``Sample`` whose prompt segments come from ``segments`` (a recording
    served at ``version``; empty: none), with a ``PromptGraph`` where Note [Graph samples] allows."""
    prompt_segments = tuple(
        PromptSegment(s, e, None if t is None else Recording(version, _projections(t)))
        for s, e, t in segments)
    graph = _graph(segments, p.prompt_ids, version, trainer)
    ref = None if p.ref_logprobs is None else torch.tensor(p.ref_logprobs, dtype=torch.float32)
    return Sample(p.prompt_ids, p.response_ids, prompt_segments, p.kind, p.weight, ref, graph)


def _projections(tensors: _Tensors) -> dict[str, torch.Tensor | LayerRows]:
    return {name: t for name, t in tensors.items() if name in PROJECTIONS}


def _graph(segments: Sequence[RecordedSegment], prompt_ids: Sequence[int], version: int,
           trainer: ReplayTrainer) -> PromptGraph | None:
    n = len(prompt_ids) - 1
    if not segments or n < 1:
        return None
    start, end, tensors = segments[0]
    if start != 0 or end < n or tensors is None or any(k not in tensors for k in GRAPH_ROW_NAMES):
        return None
    if not trainer.config.replay:  # no rebuild the planner would not use
        return None
    rows: dict[str, torch.Tensor | LayerRows] = {}
    for name in GRAPH_ROW_NAMES:
        t = tensors[name]
        rows[name] = t[:, :n] if isinstance(t, torch.Tensor) else t.rows(0, n)
    ids = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    return rebuild_prompt_graph(trainer.weights, trainer.rope, ids, rows, version)
