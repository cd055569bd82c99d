"""Graph replay: one decoder layer of a sample whose recorded prompt rows run no forward op.

Owns ``graph_layer`` (one layer of a graph-planned sample, ``PlannedSample.graph``) and
``graph_embed`` (its layer-0 input), and the streams the work units pass between layers for any
sample (``first_streams`` / ``layer_streams`` / ``head_streams``: graph or not). The recorded prompt rows go through ``_GraphLayer``, an
autograd function whose backward is graph_backward.py's ``layer_backward``; the live rows run
layer.py's layer code. Imports only torch and lower train/ modules (the work units call it).

Note [Graph replay]: a sample planned with a graph recording (samples.py: every layer's
``GraphRecording`` of the prompt rows [0, P - 1); exact gradients, no LoRA dropout) is split,
as graph_backward.py's Note [Prompt and response rows] says, into
  * the recorded rows [0, P - 1): per layer, ``_GraphLayer.apply`` runs no layer op. Its
    forward hands out the recorded k (after RoPE) and v [P - 1, KV, d] (views of the
    recording, moved to the compute device if they live elsewhere) and a stand-in for the
    rows' two output streams: a [P - 1, H] expand of one element, whose value nobody reads
    (the next layer's recorded rows take theirs from its recording; the head reads rows from
    P - 1 on). Its gradient is the one the next layer's input sum s1 = h + r received, which
    is the gradient of both streams, so one tensor carries it down. The backward calls
    ``layer_backward`` with that gradient for both outputs (zero at the top layer: nothing
    reads the prompt rows' last outputs) and with dk/dv from the live rows' attention, and
    returns the gradient at its own stand-in input (the previous layer's output) and the LoRA
    A/B gradients as the gradients of its inputs: the adapter's parameters are inputs of the
    function, so autograd accumulates into their ``.grad`` exactly as it does for the live
    rows' share (the two add up to the sample's), with its usual ``.grad`` semantics (None
    first, accumulate after, hooks), and no code writes ``.grad`` by hand.
  * the live rows [P - 1, P + R): row P - 1 (the first response token's label row) and the
    response, through layer.py's ``_core`` (eager, nothing replayed: no recording of these
    rows exists), their queries attending to the recorded k/v, then their own causally.
Nothing of the recording is saved for backward through autograd (the function keeps a
reference on its ctx): the recording is the sample's, held until the step ends like a
store pin, so the saved-tensor offload (offload.py) moves only the live rows' activations.
LoRA dropout cannot be replayed (the masks are not recorded): the planner leaves such a sample
on the normal path, and ``graph_layer`` refuses one. In the lag-0 and full published forms
(forward.py, Note [Published adapter]) the backward uses the same forms as ``_core``; the
recorded values are exact only for what the recording was made with (samples.py, Note
[Staleness]).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import torch
import torch.nn.functional as F

from alchemist_sgl.train.context import LayerContext
from alchemist_sgl.train.graph_backward import GraphLora, GraphRecording, layer_backward
from alchemist_sgl.train.forward import Streams
from alchemist_sgl.train.layer import embed_streams, layer_shape, rows_after, run_layer
from alchemist_sgl.train.lora import LoraAdapter
from alchemist_sgl.train.samples import PlannedSample
from alchemist_sgl.train.weights import LayerWeights


@dataclass(frozen=True)
class _Backward:
    """What ``_GraphLayer``'s backward reads besides the incoming gradients."""

    rec: GraphRecording
    lw: LayerWeights
    lora: GraphLora | None
    cos: torch.Tensor
    sin: torch.Tensor
    device: torch.device
    has_input: bool  # a stand-in input (layer > 0) to return the input gradient to


class _Ctx(Protocol):
    info: _Backward


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, non_blocking=True)


class _GraphLayer(torch.autograd.Function):
    """(k, v, stand-in) of the recorded rows from ``info``'s recording (Note [Graph replay]);
    inputs: ``info``, the previous layer's stand-in (None at layer 0) and the LoRA A's then B's
    of ``info.lora`` in its order (per projection, per pair)."""

    @staticmethod
    def forward(ctx: _Ctx, info: _Backward, prompt_in: torch.Tensor | None,
                *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.info = info
        rec = info.rec
        k, v = _on(rec.k, info.device), _on(rec.v, info.device)
        stand_in = torch.zeros((), dtype=rec.s2.dtype, device=info.device).expand(rec.s2.shape)
        return k.view_as(k), v.view_as(v), stand_in

    @staticmethod
    def backward(ctx: _Ctx, dk: torch.Tensor, dv: torch.Tensor,
                 d_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        info = ctx.info
        rec = GraphRecording(**{f.name: _on(getattr(info.rec, f.name), info.device)
                                for f in fields(GraphRecording)})
        g = layer_backward(rec, info.lw, info.lora, info.cos, info.sin, d_out, d_out,
                           dk_extra=dk, dv_extra=dv)
        flat = [t for per in g.da for t in per] + [t for per in g.db for t in per]
        return (None, g.d_input if info.has_input else None, *flat)


def graph_embed(ctx: LayerContext, planned: PlannedSample) -> torch.Tensor:
    """Layer 0's hidden input of the live rows [P - 1, T): their embedding (no residual yet)."""
    ids = planned.input_ids[planned.prompt_len - 1:].to(ctx.weights.device)
    return F.embedding(ids, ctx.weights.embed)


def graph_layer(ctx: LayerContext, layer: int, adapter: LoraAdapter, planned: PlannedSample,
                hidden: torch.Tensor, residual: torch.Tensor | None,
                prompt: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer of a graph-planned sample (Note [Graph replay]): the live rows' (hidden,
    residual) [R + 1, H] in and out (``residual`` None at layer 0) and the recorded rows'
    stand-in (None at layer 0) in and out. ValueError with LoRA dropout in training."""
    recs = planned.graph
    if recs is None:
        raise ValueError("graph_layer needs a sample planned with a graph recording")
    w, p0, total = ctx.weights, planned.prompt_len - 1, planned.input_ids.numel()
    s, lt = layer_shape(w, layer, adapter, ctx.published, ctx.is_published_current,
                        adapter.training)
    if s.dropout > 0.0:
        raise ValueError("graph replay cannot run with LoRA dropout (its masks are not recorded)")
    lora = (GraphLora(s.rank, s.scale, s.parts, lt.a, lt.b, lt.pa, lt.pb, s.is_lag0)
            if any(s.parts) else None)
    cos_p, sin_p = ctx.rope.get(0, p0)
    info = _Backward(recs[layer], w.layers[layer], lora, cos_p, sin_p, w.device, prompt is not None)
    params = [t for per in lt.a for t in per] + [t for per in lt.b for t in per]
    k, v, stand_in = _GraphLayer.apply(info, prompt, *params)  # type: ignore[no-untyped-call]  # torch: apply is unannotated
    cos, sin = ctx.rope.get(p0, total)
    h, r = rows_after(s, w.layers[layer], hidden, residual, cos, sin, lt, (k, v))
    return h, r, stand_in


def first_streams(ctx: LayerContext, planned: PlannedSample) -> Streams:
    """Layer 0's inputs as one list (units.py): [*hidden, *residual] (``embed_streams``), or for
    a graph sample [live rows' embedding, no residual, no stand-in]."""
    if planned.graph is not None:
        return [graph_embed(ctx, planned), None, None]
    hidden, residual = embed_streams(ctx, planned)
    return [*hidden, *residual]


def layer_streams(ctx: LayerContext, layer: int, adapter: LoraAdapter, planned: PlannedSample,
                  ins: Streams) -> Streams:
    """One layer over ``first_streams``' layout: ``run_layer``, or ``graph_layer`` for a graph
    sample (the live rows' hidden and residual, then the recorded rows' stand-in)."""
    if planned.graph is not None:
        h, r, prompt = ins
        assert h is not None  # the live rows' hidden stream always holds a tensor
        return list(graph_layer(ctx, layer, adapter, planned, h, r, prompt))
    n = len(ins) // 2
    h_out, r_out = run_layer(ctx, layer, adapter, planned, ins[:n], ins[n:])
    return [*h_out, *r_out]


def head_streams(planned: PlannedSample, top: Streams) -> tuple[Streams, Streams, int]:
    """(hidden, residual, their first row) the head reads of the last layer's outputs."""
    if planned.graph is not None:
        return top[:1], top[1:2], planned.prompt_len - 1
    n = len(top) // 2
    return top[:n], top[n:], 0
