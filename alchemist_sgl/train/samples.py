"""What the runtime hands the trainer: samples made of prompt segments, with recordings.

Owns the value types ``Recording``, ``PromptSegment``, ``Sample`` and the planner ``plan_sample``
that decides, per segment and per projection, replay vs recompute (staleness, coverage, replay off),
merges adjacent recomputed ranges, and counts tokens. Imports only torch.

Data format the runtime must produce (one ``Sample`` per trained completion):
  * ``prompt_ids`` / ``response_ids``: int token ids (sequences or 1-D int64 tensors). The response
    is what the loss is on; the model input is prompt + response.
  * ``segments``: ``PromptSegment(start, end, recording)`` tiling [0, len(prompt)) in order;
    ``recording=None`` marks an uncovered range (hole, evicted page, never prefilled). Empty
    ``segments`` means the whole prompt is uncovered.
  * ``Recording(version, tensors)``: ``tensors[name]`` for any subset of ``qkv``, ``o``,
    ``gate_up``, ``down`` holds the BASE projection outputs [layers, end - start, out_dim] in the
    training dtype, on any device (moved to the trainer's device per layer slice when used);
    ``qkv`` is [q | k | v] pre-RoPE, ``gate_up`` is [gate | up] (SGLang's fused layouts). A
    ``LayerRows`` (the store's ``PagedRows``) may stand in for such a tensor: the trainer then
    reads one layer at a time straight into its projection outputs, so it must stay readable
    until the step is done (the store's pin).
  * ``kind``: ``"positive"`` (thumbs-up, correction: SFT) or ``"negative"`` (thumbs-down: the
    ``train.objective_negative`` objective); ``weight`` > 0 scales the sample's loss (e.g. |score|);
    ``ref_logprobs``: optional [len(response)] reference log-probs for the KTO objective
    (objectives.py, Note [Reference log-probs]).
  * ``graph``: optional ``PromptGraph``, one ``GraphRecording`` (graph_backward.py) per decoder
    layer over the prompt's first rows (all P, or fewer), for graph replay (graph_layer.py, Note
    [Graph replay]); the planner passes it on as ``PlannedSample.graph`` when it may be used.

Note [Staleness]: a recording is exact only if the weights that produced it equal the weights the
trainer computes now, adapter included: a non-zero adapter change moves every layer's input after
the first, so "base outputs" depend on the adapter too. ``version`` names PUBLISHED weight states
(docs/online-loop.md "One version"): the runtime labels a recording with the version that served it, and
the online loop sets the trainer's ``version`` before each step (the trainer never advances it).
lag = trainer version - recording version. lag 0 is exact while the trained adapter still equals
the published one (forward.py, Note [Published adapter]; with a publish after every step this
holds for every step); a recording with lag <= ``train.max_version_lag`` is reused (approximate:
prompt rows see old weights, response rows new ones) and counted in ``reuse_by_lag``; beyond that
its tokens are recomputed and counted in ``stale_recomputes`` (segments) and ``recomputed_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Protocol, Sequence

import torch

from alchemist_sgl.train.graph_backward import GraphRecording
from alchemist_sgl.train.spec import PROJECTIONS, LlamaSpec


class LayerRows(Protocol):
    """A recording [layers, tokens, out_dim] read one layer at a time (module docstring)."""

    shape: torch.Size
    dtype: torch.dtype

    def copy_layer(self, layer: int, out: torch.Tensor) -> torch.Tensor: ...

    def rows(self, lo: int, hi: int) -> "LayerRows": ...

    def __getitem__(self, layer: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class Recording:
    """Recorded base projection outputs of one prompt range (see module docstring)."""

    version: int
    tensors: Mapping[str, torch.Tensor | LayerRows]  # name -> [layers, tokens, out_dim]


@dataclass(frozen=True)
class PromptSegment:
    start: int
    end: int
    recording: Recording | None = None


@dataclass(frozen=True)
class PromptGraph:
    """Graph recordings of a prompt's first rows (module docstring), served at ``version`` (Note
    [Staleness]): ``layers[l]`` is decoder layer l's, in the training dtype."""

    version: int
    layers: tuple[GraphRecording, ...]


@dataclass(frozen=True)
class Sample:
    prompt_ids: Sequence[int] | torch.Tensor
    response_ids: Sequence[int] | torch.Tensor
    segments: tuple[PromptSegment, ...] = ()
    kind: Literal["positive", "negative"] = "positive"
    weight: float = 1.0
    ref_logprobs: torch.Tensor | None = None  # [len(response_ids)] fp32, KTO only
    graph: PromptGraph | None = None


@dataclass(frozen=True)
class PlannedSegment:
    """A contiguous range of the model input [start, end) computed one way: ``replay`` maps
    projection name -> recording [layers, end - start, out_dim] (empty: computed normally)."""

    start: int
    end: int
    replay: Mapping[str, torch.Tensor | LayerRows]
    lag: int = 0


@dataclass
class PlanCounts:
    replayed_tokens: int = 0       # prompt tokens with a replayed projection, or graph-replayed
    recomputed_tokens: int = 0     # prompt tokens computed normally (uncovered, stale, replay off)
    stale_recomputes: int = 0      # recorded segments refused as too stale
    reuse_by_lag: dict[int, int] = field(default_factory=dict)  # lag -> replayed tokens
    graph_samples: int = 0         # samples planned with graph replay (a PromptGraph used)

    def add(self, other: "PlanCounts") -> None:
        self.replayed_tokens += other.replayed_tokens
        self.graph_samples += other.graph_samples
        self.recomputed_tokens += other.recomputed_tokens
        self.stale_recomputes += other.stale_recomputes
        for lag, n in other.reuse_by_lag.items():
            self.reuse_by_lag[lag] = self.reuse_by_lag.get(lag, 0) + n


@dataclass(frozen=True)
class PlannedSample:
    input_ids: torch.Tensor            # [P + R] int64
    prompt_len: int
    segments: tuple[PlannedSegment, ...]
    sample: Sample
    counts: PlanCounts
    # Per layer, the recorded prompt rows [0, P - 1) when graph replay runs (Note [Graph replay]
    # in graph_layer.py); None: the segments above say how the prompt is computed.
    graph: tuple[GraphRecording, ...] | None = None


def _ids(x: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long).reshape(-1)


def plan_sample(sample: Sample, spec: LlamaSpec, *, version: int, max_version_lag: int,
                is_replay_enabled: bool, dtype: torch.dtype,
                is_response_separate: bool = False,
                is_graph_enabled: bool = False) -> PlannedSample:
    """Validates the sample and chooses replay or recompute per segment.

    ``sample.graph`` is used (``PlannedSample.graph``: its rows [0, P - 1); the counts then say
    P - 1 replayed tokens and one recomputed) when ``is_graph_enabled`` (the caller's: exact
    gradients, no LoRA dropout) and replay are on, it covers at least the rows [0, P - 1) with
    P >= 2 (a prefill records all P prompt rows; row P - 1 is recomputed) and its lag is within
    ``max_version_lag``; else (fewer rows: partial coverage) the segments decide as if it were
    absent (a stale one counted in ``stale_recomputes``).

    Adjacent recomputed ranges are merged (the response included) unless ``is_response_separate``
    (response-only gradients need a segment boundary at P - 1: ``_split_grad_rows``).

    Raises ValueError for a malformed sample (segments not tiling the prompt, empty response,
    a recording of the wrong shape or dtype, an unknown projection name): those are runtime bugs.
    A recording from the future (negative lag) is also refused with ValueError.
    """
    prompt, response = _ids(sample.prompt_ids), _ids(sample.response_ids)
    p, r = prompt.numel(), response.numel()
    if p < 1 or r < 1:
        raise ValueError(f"a sample needs a prompt and a response (got {p} and {r} tokens)")
    if sample.kind not in ("positive", "negative") or not sample.weight > 0:
        raise ValueError(f"bad sample kind {sample.kind!r} or weight {sample.weight!r}")
    segments = sample.segments or (PromptSegment(0, p, None),)
    counts = PlanCounts()
    planned: list[PlannedSegment] = []
    pos = 0
    for seg in segments:
        if seg.start != pos or seg.end <= seg.start or seg.end > p:
            raise ValueError(f"segments must tile [0, {p}) in order; got [{seg.start}, {seg.end}) at {pos}")
        pos = seg.end
        n = seg.end - seg.start
        replay: dict[str, torch.Tensor | LayerRows] = {}
        lag = 0
        if seg.recording is not None:
            _check_recording(seg.recording, spec, n, dtype)
            lag = version - seg.recording.version
            if lag < 0:
                raise ValueError(f"recording version {seg.recording.version} is newer than "
                                 f"the trainer's {version}")
            if lag > max_version_lag:
                counts.stale_recomputes += 1
            elif is_replay_enabled:
                replay = dict(seg.recording.tensors)
        if replay:
            counts.replayed_tokens += n
            counts.reuse_by_lag[lag] = counts.reuse_by_lag.get(lag, 0) + n
            planned.append(PlannedSegment(seg.start, seg.end, replay, lag))
        else:
            counts.recomputed_tokens += n
            _append_computed(planned, seg.start, seg.end)
    if pos != p:
        raise ValueError(f"segments cover [0, {pos}) but the prompt has {p} tokens")
    if is_response_separate:
        _split_grad_rows(planned, p, r)
    else:
        _append_computed(planned, p, p + r)
    graph = None
    if sample.graph is not None:
        rows = _check_graph(sample.graph, spec, dtype, version)
        if rows > p:
            raise ValueError(f"a graph recording of {rows} rows for a {p}-token prompt")
        lag = version - sample.graph.version
        if lag > max_version_lag:
            counts.stale_recomputes += 1
        elif is_graph_enabled and is_replay_enabled and 2 <= p <= rows + 1:
            graph = tuple(rec.first_rows(p - 1) for rec in sample.graph.layers)
            counts = PlanCounts(p - 1, 1, 0, {lag: p - 1}, graph_samples=1)
    return PlannedSample(torch.cat([prompt, response]), p, tuple(planned), sample, counts, graph)


def _check_graph(g: PromptGraph, spec: LlamaSpec, dtype: torch.dtype, version: int) -> int:
    """The rows every layer's recording has; ValueError for a malformed or future one."""
    if len(g.layers) != spec.layers:
        raise ValueError(f"a graph recording has {len(g.layers)} layers; the model {spec.layers}")
    if g.version > version:
        raise ValueError(f"graph recording version {g.version} is newer than the trainer's {version}")
    rows = {rec.check(spec, dtype) for rec in g.layers}
    if len(rows) != 1:
        raise ValueError(f"graph recording layers have different row counts {sorted(rows)}")
    return rows.pop()


def _split_grad_rows(planned: list[PlannedSegment], p: int, r: int) -> None:
    """Response-only planning (forward.py, Note [Response-only gradients]): a segment boundary at
    P - 1, so the rows [P - 1, P + R) (the prompt's last row, whose output is the first response
    token's label row, and the response) form the trailing segments that run with grad. A
    recorded last row stays replayed in a one-row segment of its own; a computed one is merged
    with the response. Counts are unchanged."""
    last = planned.pop()
    if last.start < p - 1:  # cut the last prompt segment at P - 1
        n = p - 1 - last.start
        rows = {k: (lambda a, b, v=v: v[:, a:b]) if isinstance(v, torch.Tensor) else v.rows
                for k, v in last.replay.items()}
        planned.append(PlannedSegment(last.start, p - 1, {k: f(0, n) for k, f in rows.items()},
                                      last.lag))
        last = PlannedSegment(p - 1, p, {k: f(n, n + 1) for k, f in rows.items()}, last.lag)
    if last.replay:
        planned.extend([last, PlannedSegment(p, p + r, {}, 0)])
    else:
        planned.append(PlannedSegment(p - 1, p + r, {}, 0))


def _append_computed(planned: list[PlannedSegment], start: int, end: int) -> None:
    """Adjacent computed ranges become one segment: recompute pays no per-segment overhead."""
    if planned and not planned[-1].replay and planned[-1].end == start:
        planned[-1] = PlannedSegment(planned[-1].start, end, {}, 0)
    else:
        planned.append(PlannedSegment(start, end, {}, 0))


def _check_recording(rec: Recording, spec: LlamaSpec, n: int, dtype: torch.dtype) -> None:
    for name, t in rec.tensors.items():
        if name not in PROJECTIONS:
            raise ValueError(f"unknown recorded projection '{name}' (known: {PROJECTIONS})")
        want = (spec.layers, n, spec.out_dim(name))
        if tuple(t.shape) != want or t.dtype != dtype:
            raise ValueError(f"recording '{name}' is {tuple(t.shape)} {t.dtype}, expected {want} {dtype}")
