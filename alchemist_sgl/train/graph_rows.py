"""A prompt's graph recording rebuilt from the rows the ``graph`` record plan stores.

Owns ``GRAPH_ROW_NAMES`` and ``rebuild_prompt_graph``: from the served forward's recorded rows of a
prompt (per layer the four projection outputs ``qkv``, ``o``, ``gate_up``, ``down``, the attention
output ``attn`` and the per-head ``lse``; core/plan.py, Note [Graph plan]) and the prompt's token
embeddings, one ``GraphRecording`` per layer (graph_backward.py), as a ``PromptGraph`` for a
``Sample``. Imports only torch and lower train/ modules.

Note [Graph rebuild]: the forward (SGLang's Llama layer; layer.py's ``_core`` is the same math,
ops.py Note [SGLang rounding]) computes, per layer l over rows [0, n):
    s1(0) = embed(ids);  rstd1(0) = rsqrt(mean(s1(0)^2) + eps)               (plain RMSNorm)
    t = down(l-1).f + s2(l-1).f;  s1(l) = rnd(t);  rstd1(l) from t (fp32)   (fused add+norm)
    q, k = rope(qkv[:, :q]), rope(qkv[:, q:q+kv]);  v = qkv[:, q+kv:]
    t = o(l).f + s1(l).f;  s2(l) = rnd(t);  rstd2(l) from t
    gate, up = gate_up[:, :F], gate_up[:, F:]
where ``.f`` upcasts to fp32 and ``rnd`` rounds to the model dtype: the norm keeps the rounded sum
as the next residual but normalises the unrounded fp32 sum. ``attn`` (P V) and ``lse`` need the
attention scores and cannot be rebuilt without a QK^T, so they are recorded. The rebuild runs the
same ops in the same dtype, so in the rows' dtype it is the recording a forward hook on every
intermediate would have taken, bit for bit where the ops are the forward's (tests). The projection
rows are the outputs the next op read (a served forward's, with the served weights: at lag 0 and
a merged adapter exactly what the trainer computes; Note [Staleness] in samples.py).
``lse`` may be stored bit-cast in the model dtype ([n, heads * 4 / element size]): it is read
back as fp32 [n, heads] unchanged.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from alchemist_sgl.train.graph_backward import GraphRecording
from alchemist_sgl.train.ops import RopeCache, apply_rope
from alchemist_sgl.train.samples import LayerRows, PromptGraph
from alchemist_sgl.train.weights import BaseWeights

GRAPH_ROW_NAMES = ("qkv", "o", "gate_up", "down", "attn", "lse")
Rows = torch.Tensor | LayerRows  # [layers, n, width]


def _layer(rows: Rows, layer: int, device: torch.device) -> torch.Tensor:
    out = torch.empty(tuple(rows.shape[1:]), dtype=rows.dtype, device=device)
    if isinstance(rows, torch.Tensor):
        return out.copy_(rows[layer])
    return rows.copy_layer(layer, out)


def _lse(rows: Rows, layer: int, heads: int, device: torch.device) -> torch.Tensor:
    t = _layer(rows, layer, device)
    lse = t if t.dtype == torch.float32 else t.view(torch.float32)
    if lse.shape[1] != heads:
        raise ValueError(f"lse rows of {tuple(t.shape)} {t.dtype} are not {heads} fp32 heads")
    return lse


def _sum_and_rstd(a: torch.Tensor, b: torch.Tensor | None,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rounded input sum, its fp32 reciprocal RMS) of a norm over ``a`` (+ ``b``)."""
    total = a.float() if b is None else a.float() + b.float()
    rstd = torch.rsqrt(total.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (a if b is None else total.to(a.dtype)), rstd


def rebuild_prompt_graph(weights: BaseWeights, rope: RopeCache, prompt_ids: torch.Tensor,
                         rows: Mapping[str, Rows], version: int) -> PromptGraph:
    """The ``PromptGraph`` of the first n prompt rows (n = the rows' length) from ``rows``
    (``GRAPH_ROW_NAMES`` -> [layers, n, width], the model dtype; ``lse`` fp32 or bit-cast) and
    the embedding of ``prompt_ids[:n]`` (Note [Graph rebuild]), on the weights' device, labelled
    with the ``version`` that served them. ValueError for missing or misshapen rows."""
    spec, device, dtype = weights.spec, weights.device, weights.dtype
    missing = [name for name in GRAPH_ROW_NAMES if name not in rows]
    if missing:
        raise ValueError(f"graph rows lack {missing}")
    n = int(rows["qkv"].shape[1])
    if any(int(r.shape[0]) != spec.layers or int(r.shape[1]) != n for r in rows.values()):
        raise ValueError(f"graph rows must all be [{spec.layers}, {n}, width]")
    if n < 1 or n > prompt_ids.numel():
        raise ValueError(f"{n} graph rows for a {prompt_ids.numel()}-token prompt")
    qs, kvs, inter = spec.q_size, spec.kv_size, spec.intermediate
    cos, sin = rope.get(0, n)
    layers: list[GraphRecording] = []
    with torch.no_grad():
        s1, rstd1 = _sum_and_rstd(F.embedding(prompt_ids[:n].to(device), weights.embed), None,
                                  spec.rms_norm_eps)
        for layer in range(spec.layers):
            qkv, o, gate_up, attn = (_layer(rows[name], layer, device)
                                     for name in ("qkv", "o", "gate_up", "attn"))
            if qkv.dtype != dtype:
                raise ValueError(f"graph rows are {qkv.dtype}; the model computes in {dtype}")
            s2, rstd2 = _sum_and_rstd(o, s1, spec.rms_norm_eps)
            rec = GraphRecording(
                s1=s1, rstd1=rstd1,
                q=apply_rope(qkv[:, :qs].view(n, spec.heads, spec.head_dim), cos, sin),
                k=apply_rope(qkv[:, qs:qs + kvs].view(n, spec.kv_heads, spec.head_dim), cos, sin),
                v=qkv[:, qs + kvs:].reshape(n, spec.kv_heads, spec.head_dim), attn=attn,
                lse=_lse(rows["lse"], layer, spec.heads, device), s2=s2, rstd2=rstd2,
                gate=gate_up[:, :inter], up=gate_up[:, inter:])
            rec.check(spec, dtype)
            layers.append(rec)
            if layer + 1 < spec.layers:
                s1, rstd1 = _sum_and_rstd(_layer(rows["down"], layer, device), s2,
                                          spec.rms_norm_eps)
    return PromptGraph(version, tuple(layers))
