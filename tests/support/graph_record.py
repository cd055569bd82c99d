"""Recordings for train/graph_backward.py, taken from the layer code the trainer runs.

``record_layer`` runs train/layer.py's ``_core`` (the eager joint layer) once, without grad, and
keeps what ``GraphRecording`` lists by wrapping the ops layer.py calls (its module globals
``rmsnorm`` / ``add_rmsnorm`` / ``apply_rope`` / ``causal_attention`` / ``_lora_add``) for the
duration of the call; the log-sum-exp is computed from the q and k it saw. ``response_rows`` runs
the same ``_core`` over later rows whose queries attend to a recording's k/v as leaves (Note
[Prompt and response rows] in graph_backward.py); ``record_prompt`` records a whole prompt's
rows [0, P - 1), layer by layer, for a sample's ``PromptGraph``. Production code keeps no test
hook.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from alchemist_sgl.train import layer as layer_mod
from alchemist_sgl.train.graph_backward import GraphLora, GraphRecording
from alchemist_sgl.train.layer import LayerLoraTensors, LayerShape, layer_shape
from alchemist_sgl.train.lora import FrozenLora, LoraAdapter
from alchemist_sgl.train.ops import RopeCache, causal_attention
from alchemist_sgl.train.samples import PromptGraph
from alchemist_sgl.train.weights import BaseWeights, LayerWeights

NO_RECS = (None, None, None, None)


def causal_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[n, H] fp32 natural log-sum-exp of the causal scaled scores (head h uses kv head h // G)."""
    n, heads, _ = q.shape
    kk = k.repeat_interleave(heads // k.shape[1], dim=1)
    s = torch.einsum("ihd,jhd->hij", q.float(), kk.float()) * scale
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.logsumexp(s, dim=-1).t().contiguous()


@contextlib.contextmanager
def _wrapped(s: LayerShape, kept: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    orig = {name: getattr(layer_mod, name)
            for name in ("rmsnorm", "add_rmsnorm", "apply_rope", "causal_attention", "_lora_add")}

    def rstd(x: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + s.eps)

    def rmsnorm(h, w, eps):  # layer 0: the embedding is s1
        kept["sum"].append(h)
        kept["rstd"].append(rstd(h))
        return orig["rmsnorm"](h, w, eps)

    def add_rmsnorm(x, residual, w, eps):
        out, total = orig["add_rmsnorm"](x, residual, w, eps)
        kept["sum"].append(total)
        kept["rstd"].append(rstd(x.float() + residual.float()))
        return out, total

    def apply_rope(x, cos, sin):
        out = orig["apply_rope"](x, cos, sin)
        kept["rope"].append(out)
        return out

    def attention(q, k, v, scale, **kw):
        out = orig["causal_attention"](q, k, v, scale, **kw)
        kept["v"].append(v)
        kept["attn"].append(out)
        kept["lse"].append(causal_lse(q, k, scale))
        return out

    def lora_add(shape, k, x, parts, lt):
        out = orig["_lora_add"](shape, k, x, parts, lt)
        if k == 2:
            kept["gate_up"].extend(out)
        kept["proj"].append(torch.cat(out, dim=-1))  # the output the next op reads
        return out

    new = {"rmsnorm": rmsnorm, "add_rmsnorm": add_rmsnorm, "apply_rope": apply_rope,
           "causal_attention": attention, "_lora_add": lora_add}
    for name, fn in new.items():
        setattr(layer_mod, name, fn)
    try:
        yield
    finally:
        for name, fn in orig.items():
            setattr(layer_mod, name, fn)


def record_layer(s: LayerShape, lw: LayerWeights, hidden: torch.Tensor,
                 residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                 lt: LayerLoraTensors) -> tuple[GraphRecording, tuple[torch.Tensor, torch.Tensor]]:
    """(the recording, the layer's (hidden, residual) outputs) of one no-grad ``_core`` call."""
    rec, out, _ = _record_layer(s, lw, hidden, residual, cos, sin, lt)
    return rec, out


def _record_layer(s, lw, hidden, residual, cos, sin, lt):
    """``record_layer``'s results and the graph plan's rows of the call (name -> [n, width])."""
    kept: dict[str, list[torch.Tensor]] = {k: [] for k in ("sum", "rstd", "rope", "v", "attn",
                                                           "lse", "gate_up", "proj")}
    with torch.no_grad(), _wrapped(s, kept):
        out = layer_mod._core(s, hidden, residual, lw.input_layernorm, lw.post_attention_layernorm,
                              lw.qkv, lw.o, lw.gate_up, lw.down, cos, sin, NO_RECS, lt)
    rec = GraphRecording(s1=kept["sum"][0], rstd1=kept["rstd"][0], q=kept["rope"][0],
                         k=kept["rope"][1], v=kept["v"][0], attn=kept["attn"][0],
                         lse=kept["lse"][0], s2=kept["sum"][1], rstd2=kept["rstd"][1],
                         gate=kept["gate_up"][0], up=kept["gate_up"][1])
    rows = dict(zip(("qkv", "o", "gate_up", "down"), kept["proj"]))
    return rec, out, {**rows, "attn": kept["attn"][0], "lse": kept["lse"][0]}


def response_rows(s: LayerShape, lw: LayerWeights, hidden: torch.Tensor,
                  residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  lt: LayerLoraTensors, k_prev: torch.Tensor,
                  v_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_core`` over rows that follow ``k_prev``/``v_prev``'s rows [P, KV, d] (cos/sin for
    their own positions): their queries see the earlier keys and their own, causally."""
    p_len = k_prev.shape[0]

    def attention(q, k, v, scale, **kw):
        return causal_attention(q, torch.cat([k_prev, k]), torch.cat([v_prev, v]), scale,
                                key_offset=p_len, is_gqa=kw.get("is_gqa"))

    orig = layer_mod.causal_attention
    layer_mod.causal_attention = attention
    try:
        return layer_mod._core(s, hidden, residual, lw.input_layernorm,
                               lw.post_attention_layernorm, lw.qkv, lw.o, lw.gate_up, lw.down,
                               cos, sin, NO_RECS, lt)
    finally:
        layer_mod.causal_attention = orig


def record_prompt(weights: BaseWeights, adapter: LoraAdapter | None, prompt_ids: torch.Tensor,
                  rope: RopeCache, *, rows: int | None = None, version: int = 0,
                  published: FrozenLora | None = None, is_lag0: bool = False) -> PromptGraph:
    """A ``PromptGraph`` of the first ``rows`` rows of ``prompt_ids`` [P] (default all P, as a
    prefill records them), layer by layer through ``record_layer`` with ``adapter`` (and
    ``published``: layer.py's ``layer_shape``): what the trainer's own forward computes; with
    ``adapter=None`` the base tensors as they are (a merged server's prefill)."""
    n = prompt_ids.numel() if rows is None else rows
    hidden = F.embedding(prompt_ids[:n].to(weights.device), weights.embed)
    residual = None
    cos, sin = rope.get(0, n)
    recs = []
    for layer in range(weights.spec.layers):
        s, lt = layer_shape(weights, layer, adapter, published, is_lag0, False)
        rec, (hidden, residual) = record_layer(s, weights.layers[layer], hidden, residual, cos,
                                               sin, lt)
        recs.append(rec)
    return PromptGraph(version, tuple(recs))


def record_prompt_rows(weights: BaseWeights, adapter: LoraAdapter | None,
                       prompt_ids: torch.Tensor, rope: RopeCache, *, rows: int | None = None,
                       published: FrozenLora | None = None,
                       is_lag0: bool = False) -> tuple[PromptGraph, dict[str, torch.Tensor]]:
    """``record_prompt``'s ``PromptGraph`` (version 0) and, from the same forward, the rows the
    ``graph`` record plan stores: name -> [layers, n, width] (the four projections' outputs as
    the next op reads them, ``attn`` before o_proj, ``lse`` fp32 [layers, n, heads])."""
    n = prompt_ids.numel() if rows is None else rows
    hidden = F.embedding(prompt_ids[:n].to(weights.device), weights.embed)
    residual = None
    cos, sin = rope.get(0, n)
    recs, per_layer = [], []
    for layer in range(weights.spec.layers):
        s, lt = layer_shape(weights, layer, adapter, published, is_lag0, False)
        rec, (hidden, residual), got = _record_layer(s, weights.layers[layer], hidden, residual,
                                                     cos, sin, lt)
        recs.append(rec)
        per_layer.append(got)
    stacked = {name: torch.stack([got[name] for got in per_layer]) for name in per_layer[0]}
    return PromptGraph(0, tuple(recs)), stacked


def graph_lora(s: LayerShape, lt: LayerLoraTensors) -> GraphLora | None:
    """layer.py's LoRA tensors as graph_backward reads them (None without LoRA)."""
    if not any(s.parts):
        return None
    return GraphLora(s.rank, s.scale, s.parts, lt.a, lt.b, lt.pa, lt.pb, s.is_lag0)
