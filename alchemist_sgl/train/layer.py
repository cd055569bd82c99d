"""One decoder layer over all rows of a sample at once (the joint layout), eager or compiled.

Owns ``joint_layer`` (and ``run_layer`` / ``embed_streams``, which pick the trainer's layout): SGLang's two streams [T, H] in and out for one layer, the recorded base
projection outputs replayed where the plan says so, the LoRA correction of forward.py's Note
[Published adapter]. Used by the whole-sample joint forward (joint.py) and by the work units
(units.py): one copy of the layer code. Imports only torch.

Note [Joint layer]: every op runs once over all T rows, exactly as the recompute baseline (which
is this code with nothing recorded); only the four base projections differ. Eager, ops.py's
``row_replayed_linear`` writes each projection into one [T, d] output: recorded rows copied in
(from a ``PagedRows``, straight from the store's pinned pages: the only copy of the recording),
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
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
import torch.nn.functional as F

from alchemist_sgl.train.forward import (_PART_INDEX, Streams, _LayerLora, decoder_layer,
                                         embed_segments)
from alchemist_sgl.train.ops import add_rmsnorm, apply_rope, causal_attention, rmsnorm, row_replayed_linear
from alchemist_sgl.train.samples import PlannedSample
from alchemist_sgl.train.spec import PROJECTIONS
from alchemist_sgl.train.weights import BaseWeights

if TYPE_CHECKING:
    from alchemist_sgl.train.trainer import ReplayTrainer

# How many joint_layer calls took the compiled path and the eager one (status and tests).
CALLS = {"compiled": 0, "eager": 0}
# Profiler region of a read-out of recorded rows (store/readout.py has the same name).
READOUT_REGION = "alchemist::replay_readout"


class _PrefixReplayed(torch.autograd.Function):
    """y = x @ W.T where rows [0, n) were recorded (Note [Joint layer])."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recorded: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return torch.cat([recorded, F.linear(x[recorded.shape[0]:], weight)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad.matmul(weight), None, None


def _project(x: torch.Tensor, weight: torch.Tensor, rec) -> torch.Tensor:
    if rec is None:
        return F.linear(x, weight)
    if isinstance(rec, torch.Tensor):
        if torch.is_grad_enabled() and x.requires_grad:
            return _PrefixReplayed.apply(x, weight, rec)
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

    a: tuple[tuple[torch.Tensor, ...], ...]
    b: tuple[tuple[torch.Tensor, ...], ...]
    pa: tuple[tuple[torch.Tensor, ...], ...]
    pb: tuple[tuple[torch.Tensor, ...], ...]


def lora_tensors(adapter, published, layer: int, is_lag0: bool) -> tuple[tuple, LayerLoraTensors]:
    """(per-projection part indices, tensors) of one layer; adapter None: no LoRA."""
    if adapter is None:
        empty = ((),) * 4
        return empty, LayerLoraTensors(empty, empty, empty, empty)
    parts, a, b, pa, pb = [], [], [], [], []
    for proj in PROJECTIONS:
        pairs = adapter.pairs(layer, proj)
        parts.append(tuple(_PART_INDEX[t] for t, _, _ in pairs))
        a.append(tuple(p[1] for p in pairs))
        b.append(tuple(p[2] for p in pairs))
        pub = [] if published is None or is_lag0 else published.pairs(layer, proj)
        pa.append(tuple(p[1] for p in pub))
        pb.append(tuple(p[2] for p in pub))
    return tuple(parts), LayerLoraTensors(tuple(a), tuple(b), tuple(pa), tuple(pb))


def _deltas(x, a_list, b_list, scale: float, rank: int, dtype):
    a = a_list[0] if len(a_list) == 1 else torch.cat(a_list, dim=0)
    xa = F.linear(x, a.to(dtype)) * scale
    return [F.linear(xa if len(b_list) == 1 else xa[:, j * rank:(j + 1) * rank], bt.to(dtype))
            for j, bt in enumerate(b_list)]


def _lora_add(s: LayerShape, k: int, x, parts: list, lt: LayerLoraTensors) -> list:
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


def _core(s: LayerShape, hidden, residual, ln1, ln2, w_qkv, w_o, w_gu, w_down, cos, sin,
          recs: tuple, lt: LayerLoraTensors):
    """The layer's math (Note [Joint layer]); ``residual`` None at layer 0."""
    total = hidden.shape[0]
    if residual is None:
        residual = hidden
        x = rmsnorm(hidden, ln1, s.eps)
    else:
        x, residual = add_rmsnorm(hidden, residual, ln1, s.eps)
    qkv = _project(x, w_qkv, recs[0])
    q, k, v = _lora_add(s, 0, x, list(qkv.split([s.q_size, s.kv_size, s.kv_size], -1)), lt)
    q = apply_rope(q.view(total, s.heads, s.head_dim), cos, sin)
    k = apply_rope(k.view(total, s.kv_heads, s.head_dim), cos, sin)
    attn = causal_attention(q, k, v.reshape(total, s.kv_heads, s.head_dim), s.head_dim ** -0.5,
                            is_gqa=s.is_gqa)
    (o,) = _lora_add(s, 1, attn, [_project(attn, w_o, recs[1])], lt)
    x, residual = add_rmsnorm(o, residual, ln2, s.eps)
    gate_up = _project(x, w_gu, recs[2])
    g, u = _lora_add(s, 2, x, list(gate_up.split([s.intermediate, s.intermediate], -1)), lt)
    m = F.silu(g) * u
    (hidden,) = _lora_add(s, 3, m, [_project(m, w_down, recs[3])], lt)
    return hidden, residual


@functools.lru_cache(maxsize=None)
def _core_for(s: LayerShape, is_compiled: bool) -> Callable:
    fn = functools.partial(_core, s)
    if not is_compiled:
        return fn
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(fn, dynamic=True)


def layer_recordings(planned: PlannedSample, layer: int, device, is_compiled: bool = False
                     ) -> tuple[tuple, bool]:
    """Per projection (PROJECTIONS order): None or the recorded rows of ``layer`` (Note [Joint
    layer]); and whether every recording is a prefix. Eager (``is_compiled`` False): a ranges list
    for ``row_replayed_linear`` whose recorded entries fill the output's rows in place (one copy,
    straight from the store's pages for a ``PagedRows``: store/readout.py, Note [Per-layer
    read-out]). Compiled: a [n, d] prefix tensor where every recording is a prefix."""
    out, is_prefix_only = [], True
    for name in PROJECTIONS:
        ranges, recorded = [], 0
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


def _merge(ranges):
    merged: list = []
    for start, end, rec in ranges:
        if rec is None and merged and merged[-1][2] is None:
            merged[-1] = (merged[-1][0], end, None)
        else:
            merged.append((start, end, rec))
    return merged


def _filler(rec, layer: int):
    """The recording's rows of ``layer``: a tensor view, or a function that copies them into the
    output rows it is given (a ``PagedRows``)."""
    if isinstance(rec, torch.Tensor):
        return rec[layer]
    return functools.partial(rec.copy_layer, layer)


def _prefix_rows(ranges, layer: int, device) -> torch.Tensor:
    """The recorded prefix rows [n, d] of ``layer`` as one tensor on ``device``."""
    recs = [(a, b, rec) for a, b, rec in ranges if rec is not None]
    if len(recs) == 1 and isinstance(recs[0][2], torch.Tensor):
        return recs[0][2][layer].to(device, non_blocking=True)
    out = torch.empty((recs[-1][1], recs[0][2].shape[2]), dtype=recs[0][2].dtype, device=device)
    with torch.profiler.record_function(READOUT_REGION):
        for a, b, rec in recs:
            fill = _filler(rec, layer)
            fill(out[a:b]) if callable(fill) else out[a:b].copy_(fill, non_blocking=True)
    return out


def joint_layer(weights: BaseWeights, layer: int, adapter, published, is_lag0: bool,
                is_training: bool, planned: PlannedSample, rope, hidden: torch.Tensor,
                residual: torch.Tensor | None, *, is_compiled: bool = False):
    """One layer, joint layout (Note [Joint layer]): (hidden, residual) [T, H] in and out; at
    layer 0 ``hidden`` is the embedding and ``residual`` None. ``adapter``: the trained
    ``LoraAdapter`` or None (the base tensors as they are); ``published``/``is_lag0``: forward.py,
    Note [Published adapter]. ``is_compiled``: Note [Compiled layer] (falls back to eager where
    it does not apply)."""
    spec, lw = weights.spec, weights.layers[layer]
    parts, lt = lora_tensors(adapter, published, layer, is_lag0 and published is not None)
    has_lora = adapter is not None
    s = LayerShape(spec.rms_norm_eps, spec.heads, spec.kv_heads, spec.head_dim, spec.q_size,
                   spec.kv_size, spec.intermediate,
                   rank=adapter.rank if has_lora else 0,
                   scale=adapter.scale if has_lora else 0.0,
                   dropout=adapter.dropout if has_lora and is_training else 0.0,
                   parts=parts, is_lag0=has_lora and published is not None and is_lag0,
                   has_published=has_lora and published is not None and not is_lag0,
                   is_gqa=spec.kv_heads != spec.heads)
    if has_lora and published is not None and not is_lag0 and (
            published.rank, published.targets) != (adapter.rank, adapter.targets):
        raise ValueError("the published adapter must have the trained adapter's rank and targets")
    can_compile = is_compiled and residual is not None and s.dropout == 0.0
    recs, is_prefix_only = layer_recordings(planned, layer, weights.device, can_compile)
    use_compiled = can_compile and is_prefix_only
    cos, sin = rope.get(0, hidden.shape[0])
    CALLS["compiled" if use_compiled else "eager"] += 1
    return _core_for(s, use_compiled)(hidden, residual, lw.input_layernorm,
                                      lw.post_attention_layernorm, lw.qkv, lw.o, lw.gate_up,
                                      lw.down, cos, sin, recs, lt)


def embed_streams(trainer: "ReplayTrainer", planned: PlannedSample) -> tuple[Streams, Streams]:
    """Layer 0's streams: the embedding, one tensor per segment (segments layout) or one [T, H]
    tensor (joint layout), and no residual yet."""
    w = trainer.weights
    if trainer.layout == "joint":
        hidden: Streams = [torch.nn.functional.embedding(planned.input_ids.to(w.device), w.embed)]
    else:
        hidden = list(embed_segments(w, planned))
    return hidden, [None] * len(hidden)


def run_layer(trainer: "ReplayTrainer", layer: int, adapter, planned: PlannedSample,
              hidden: Streams, residual: Streams) -> tuple[Streams, Streams]:
    """One decoder layer in the trainer's layout (layer.py, Note [Joint layer], or forward.py,
    Note [Segments]); ``adapter=None`` computes the base tensors as they are."""
    t, w = trainer, trainer.weights
    is_training = adapter is not None and adapter.training
    if t.layout == "joint":
        h, r = joint_layer(w, layer, adapter, t.published, t.is_published_current, is_training,
                           planned, t.rope, hidden[0], residual[0], is_compiled=t.is_compiled)
        return [h], [r]
    lora = _LayerLora(adapter, layer, is_training, w.dtype, t.published, t.is_published_current)
    return decoder_layer(w, layer, lora, planned, t.rope, hidden, residual)
