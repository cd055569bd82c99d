"""One decoder layer over all rows of a sample at once (the joint layout), eager or compiled.

Owns ``joint_layer`` (and ``run_layer`` / ``embed_streams``, which pick the layout of a
``LayerContext``, context.py): SGLang's two streams [T, H] in and out for one layer, the recorded
base projection outputs replayed where the plan says so, the LoRA correction of forward.py's Note
[Published adapter]. Used by the whole-sample joint forward (joint.py) and by the work units
(units.py): one copy of the layer code. Imports only torch and lower train/ modules (never the
trainer: it reads a ``LayerContext``).

Note [Joint layer]: every op runs once over all T rows, exactly as the recompute baseline (which
is this code with nothing recorded); only the four base projections differ. Eager, ops.py's
``row_replayed_linear`` writes each projection into one [T, d] output: recorded rows copied in
(from a ``PagedRows``, straight from the store's pinned pages: the only copy of the recording;
replay_rows.py reads them out),
the other rows computed by a matmul into their rows; its backward is ONE matmul over all rows,
dL/dx = dL/dy @ W (exact for recorded and computed rows alike: W is frozen). Compiled, a
recording that is a prefix [0, n) of the input (the normal case: a prompt is covered from its
start, the response never is) is read into one [n, d] tensor first (profiler region
``READOUT_REGION``, as the store's read-out), and ``_PrefixReplayed`` returns
cat(recording, x[n:] @ W.T) with the same backward. Other coverings (a hole inside the prompt)
run eager.

Note [Compiled layer]: ``train.compile`` runs the layer through ``torch.compile`` (inductor, CPU
or CUDA) with dynamic shapes. The compiled function takes only tensors and tuples of tensors;
everything that changes the graph (model dims, LoRA rank/scale, which projections are replayed,
lag-0 vs full LoRA form, grad on/off) is fixed per closure (``_core_for``), so one compiled graph
serves every layer > 0 and every sequence length of a configuration, and the number of graphs is
small and known (warmup.py compiles them before serving starts: a compile inside the scheduler
would stall serving for seconds). Layer 0 (no residual yet, inputs without grad), LoRA dropout
and non-prefix coverings run eager.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from alchemist_sgl.train.context import LayerContext
from alchemist_sgl.train.forward import (_PART_INDEX, Streams, _LayerLora, decoder_layer,
                                         embed_segments)
from alchemist_sgl.train.lora import FrozenLora, LoraAdapter
from alchemist_sgl.train.ops import (AutogradCtx, RopeCache, add_rmsnorm, apply_rope,
                                     causal_attention, rmsnorm, row_replayed_linear)
from alchemist_sgl.train.replay_rows import LayerRecording, layer_recordings
from alchemist_sgl.train.samples import PlannedSample
from alchemist_sgl.train.spec import PROJECTIONS
from alchemist_sgl.train.weights import BaseWeights, LayerWeights

Parts = tuple[tuple[int, ...], ...]  # per projection: the indices of its trained parts
Tensors = tuple[tuple[torch.Tensor, ...], ...]  # per projection: one tensor per trained part


class _PrefixReplayed(torch.autograd.Function):
    """y = x @ W.T where rows [0, n) were recorded (Note [Joint layer])."""

    @staticmethod
    def forward(ctx: AutogradCtx, x: torch.Tensor, weight: torch.Tensor,
                recorded: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return torch.cat([recorded, F.linear(x[recorded.shape[0]:], weight)])

    @staticmethod
    def backward(ctx: AutogradCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return grad.matmul(weight), None, None


def _project(x: torch.Tensor, weight: torch.Tensor, rec: LayerRecording) -> torch.Tensor:
    if rec is None:
        return F.linear(x, weight)
    if isinstance(rec, torch.Tensor):
        if torch.is_grad_enabled() and x.requires_grad:
            out: torch.Tensor = _PrefixReplayed.apply(x, weight, rec)  # type: ignore[no-untyped-call]  # torch: apply is unannotated
            return out
        return torch.cat([rec, F.linear(x[rec.shape[0]:], weight)])
    return row_replayed_linear(x, weight, rec)


@dataclass(frozen=True)
class LayerShape:
    """What fixes a layer's graph besides tensor shapes (Note [Compiled layer])."""

    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    q_size: int
    kv_size: int
    intermediate: int
    rank: int = 0
    scale: float = 0.0
    dropout: float = 0.0
    parts: tuple[tuple[int, ...], ...] = ((), (), (), ())  # per projection: trained part indices
    is_lag0: bool = False
    has_published: bool = False
    is_gqa: bool = False  # kv_heads < heads, as a plain bool: dynamic shapes make the ints symbolic


class LayerLoraTensors(NamedTuple):
    """One layer's LoRA tensors per projection (PROJECTIONS order): trained A's and B's (the
    adapter's parameters, fp32) and, for the full form, the published ones (constants)."""

    a: Tensors
    b: Tensors
    pa: Tensors
    pb: Tensors


def lora_tensors(adapter: LoraAdapter | None, published: FrozenLora | None, layer: int,
                 is_lag0: bool) -> tuple[Parts, LayerLoraTensors]:
    """(per-projection part indices, tensors) of one layer; adapter None: no LoRA."""
    if adapter is None:
        empty: Tensors = ((),) * 4
        return ((),) * 4, LayerLoraTensors(empty, empty, empty, empty)
    parts: list[tuple[int, ...]] = []
    a: list[tuple[torch.Tensor, ...]] = []
    b: list[tuple[torch.Tensor, ...]] = []
    pa: list[tuple[torch.Tensor, ...]] = []
    pb: list[tuple[torch.Tensor, ...]] = []
    for proj in PROJECTIONS:
        pairs = adapter.pairs(layer, proj)
        parts.append(tuple(_PART_INDEX[t] for t, _, _ in pairs))
        a.append(tuple(p[1] for p in pairs))
        b.append(tuple(p[2] for p in pairs))
        pub = [] if published is None or is_lag0 else published.pairs(layer, proj)
        pa.append(tuple(p[1] for p in pub))
        pb.append(tuple(p[2] for p in pub))
    return tuple(parts), LayerLoraTensors(tuple(a), tuple(b), tuple(pa), tuple(pb))


def _deltas(x: torch.Tensor, a_list: tuple[torch.Tensor, ...], b_list: tuple[torch.Tensor, ...],
            scale: float, rank: int, dtype: torch.dtype) -> list[torch.Tensor]:
    a = a_list[0] if len(a_list) == 1 else torch.cat(a_list, dim=0)
    xa = F.linear(x, a.to(dtype)) * scale
    return [F.linear(xa if len(b_list) == 1 else xa[:, j * rank:(j + 1) * rank], bt.to(dtype))
            for j, bt in enumerate(b_list)]


def _lora_add(s: LayerShape, k: int, x: torch.Tensor, parts: list[torch.Tensor],
              lt: LayerLoraTensors) -> list[torch.Tensor]:
    """parts[i] += the LoRA correction of projection k (forward.py, Note [Published adapter])."""
    idx = s.parts[k]
    if not idx:
        return parts
    if s.is_lag0:
        if not torch.is_grad_enabled():
            return parts
        x = x.detach()
    if s.dropout > 0.0:
        x = F.dropout(x, s.dropout, training=True)
    deltas = _deltas(x, lt.a[k], lt.b[k], s.scale, s.rank, x.dtype)
    if s.has_published:
        for i, d, dp in zip(idx, deltas, _deltas(x, lt.pa[k], lt.pb[k], s.scale, s.rank, x.dtype)):
            parts[i] = parts[i] + (d - dp)
        return parts
    for i, d in zip(idx, deltas):
        parts[i] = parts[i] + ((d - d.detach()) if s.is_lag0 else d)
    return parts


def _core(s: LayerShape, hidden: torch.Tensor, residual: torch.Tensor | None, ln1: torch.Tensor,
          ln2: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor, w_gu: torch.Tensor,
          w_down: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          recs: tuple[LayerRecording, ...], lt: LayerLoraTensors,
          prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's math (Note [Joint layer]); ``residual`` None at layer 0. ``prefix_kv``: k
    (after RoPE) and v [m, KV, d] of m earlier rows the queries also see (graph_layer.py: the
    prompt's recorded rows); cos/sin are then those of the rows' own positions [m, m + n)."""
    total = hidden.shape[0]
    if residual is None:
        residual = hidden
        x = rmsnorm(hidden, ln1, s.eps)
    else:
        x, residual = add_rmsnorm(hidden, residual, ln1, s.eps)
    qkv = _project(x, w_qkv, recs[0])
    q, k, v = _lora_add(s, 0, x, list(torch.split(qkv, [s.q_size, s.kv_size, s.kv_size], -1)), lt)
    q = apply_rope(q.view(total, s.heads, s.head_dim), cos, sin)
    k = apply_rope(k.view(total, s.kv_heads, s.head_dim), cos, sin)
    v = v.reshape(total, s.kv_heads, s.head_dim)
    if prefix_kv is None:
        attn = causal_attention(q, k, v, s.head_dim ** -0.5, is_gqa=s.is_gqa)
    else:
        kp, vp = prefix_kv
        attn = causal_attention(q, torch.cat([kp, k]), torch.cat([vp, v]), s.head_dim ** -0.5,
                                key_offset=kp.shape[0], is_gqa=s.is_gqa)
    (o,) = _lora_add(s, 1, attn, [_project(attn, w_o, recs[1])], lt)
    x, residual = add_rmsnorm(o, residual, ln2, s.eps)
    gate_up = _project(x, w_gu, recs[2])
    g, u = _lora_add(s, 2, x, list(torch.split(gate_up, [s.intermediate, s.intermediate], -1)), lt)
    m = F.silu(g) * u
    (hidden,) = _lora_add(s, 3, m, [_project(m, w_down, recs[3])], lt)
    return hidden, residual


@functools.lru_cache(maxsize=None)
def _core_for(s: LayerShape, is_compiled: bool) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    fn = functools.partial(_core, s)
    if not is_compiled:
        return fn
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(fn, dynamic=True)


def rows_after(s: LayerShape, lw: LayerWeights, hidden: torch.Tensor,
               residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
               lt: LayerLoraTensors,
               prefix_kv: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer (eager, nothing replayed) over rows whose queries also see ``prefix_kv``'s
    earlier rows (``_core``; graph_layer.py, Note [Graph replay])."""
    return _core(s, hidden, residual, lw.input_layernorm, lw.post_attention_layernorm, lw.qkv,
                 lw.o, lw.gate_up, lw.down, cos, sin, (None, None, None, None), lt, prefix_kv)


def layer_shape(weights: BaseWeights, layer: int, adapter: LoraAdapter | None,
                published: FrozenLora | None, is_lag0: bool,
                is_training: bool) -> tuple[LayerShape, LayerLoraTensors]:
    """One layer's ``LayerShape`` and LoRA tensors (arguments as ``joint_layer``'s)."""
    spec = weights.spec
    parts, lt = lora_tensors(adapter, published, layer, is_lag0 and published is not None)
    has_lora = adapter is not None
    s = LayerShape(spec.rms_norm_eps, spec.heads, spec.kv_heads, spec.head_dim, spec.q_size,
                   spec.kv_size, spec.intermediate,
                   rank=adapter.rank if adapter is not None else 0,
                   scale=adapter.scale if adapter is not None else 0.0,
                   dropout=adapter.dropout if adapter is not None and is_training else 0.0,
                   parts=parts, is_lag0=has_lora and published is not None and is_lag0,
                   has_published=has_lora and published is not None and not is_lag0,
                   is_gqa=spec.kv_heads != spec.heads)
    if adapter is not None and published is not None and not is_lag0 and (
            published.rank, published.targets) != (adapter.rank, adapter.targets):
        raise ValueError("the published adapter must have the trained adapter's rank and targets")
    return s, lt


def joint_layer(weights: BaseWeights, layer: int, adapter: LoraAdapter | None,
                published: FrozenLora | None, is_lag0: bool, is_training: bool,
                planned: PlannedSample, rope: RopeCache, hidden: torch.Tensor,
                residual: torch.Tensor | None, *,
                is_compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer, joint layout (Note [Joint layer]): (hidden, residual) [T, H] in and out; at
    layer 0 ``hidden`` is the embedding and ``residual`` None. ``adapter``: the trained
    ``LoraAdapter`` or None (the base tensors as they are); ``published``/``is_lag0``: forward.py,
    Note [Published adapter]. ``is_compiled``: Note [Compiled layer] (falls back to eager where
    it does not apply)."""
    lw = weights.layers[layer]
    s, lt = layer_shape(weights, layer, adapter, published, is_lag0, is_training)
    can_compile = is_compiled and residual is not None and s.dropout == 0.0
    recs, is_prefix_only = layer_recordings(planned, layer, weights.device, can_compile)
    use_compiled = can_compile and is_prefix_only
    cos, sin = rope.get(0, hidden.shape[0])
    return _core_for(s, use_compiled)(hidden, residual, lw.input_layernorm,
                                      lw.post_attention_layernorm, lw.qkv, lw.o, lw.gate_up,
                                      lw.down, cos, sin, recs, lt)


def embed_streams(ctx: LayerContext, planned: PlannedSample) -> tuple[Streams, Streams]:
    """Layer 0's streams: the embedding, one tensor per segment (segments layout) or one [T, H]
    tensor (joint layout), and no residual yet."""
    w = ctx.weights
    if ctx.layout == "joint":
        hidden: Streams = [torch.nn.functional.embedding(planned.input_ids.to(w.device), w.embed)]
    else:
        hidden = list(embed_segments(w, planned))
    return hidden, [None] * len(hidden)


def run_layer(ctx: LayerContext, layer: int, adapter: LoraAdapter | None, planned: PlannedSample,
              hidden: Streams, residual: Streams) -> tuple[Streams, Streams]:
    """One decoder layer in the context's layout (layer.py, Note [Joint layer], or forward.py,
    Note [Segments]); ``adapter=None`` computes the base tensors as they are."""
    w = ctx.weights
    is_training = adapter is not None and adapter.training
    if ctx.layout == "joint":
        h_in = hidden[0]
        assert h_in is not None  # the joint layout's one stream always holds a tensor
        h, r = joint_layer(w, layer, adapter, ctx.published, ctx.is_published_current,
                           is_training, planned, ctx.rope, h_in, residual[0],
                           is_compiled=ctx.is_compiled)
        return [h], [r]
    lora = _LayerLora(adapter, layer, is_training, w.dtype, ctx.published, ctx.is_published_current)
    return decoder_layer(w, layer, lora, planned, ctx.rope, hidden, residual)
