"""The trainable forward of a Llama-family decoder over planned segments, with replay.

Owns ``forward_logprobs``: given frozen ``BaseWeights``, an optional ``LoraAdapter`` and a
``PlannedSample`` (samples.py), returns the log-probability of every response token under
base + adapter, with the autograd graph to the adapter's parameters. Imports only torch.

Note [Segments]: the input [prompt | response] is split into planned segments; each keeps its own
hidden/residual tensors through every layer (no per-linear slice/cat of a joint tensor). For every
projection of every layer, a segment either takes the recorded base output through
``replayed_linear`` (exact input gradient, no matmul) or computes ``F.linear``; the LoRA branch,
norms, RoPE, SiLU*mul and residual adds are always computed. Attention is recomputed once per layer
over all segments jointly (their q/k/v concatenated, one causal SDPA, the output split back into
row views), so each segment attends to the K/V of all earlier ones. With one segment (replay off,
or nothing covered) nothing is concatenated: the recompute baseline is the same code path.

Note [Response-only gradients]: ``gradient_mode="response_only"`` runs the prompt segments without
a graph and treats their K/V as constants; the response rows attend to them through a
bottom-right causal mask. It is an approximation: the gradient that flows from the response loss
back through the prompt's activations into the adapter is dropped (and the one label row that
sits at the prompt's last position carries no gradient). The prompt is computed with the
current adapter (replayed base outputs where covered), not taken from SGLang's KV pool.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F

from alchemist_sgl.train.lora import LoraAdapter
from alchemist_sgl.train.ops import (RopeCache, add_rmsnorm, apply_rope, causal_attention,
                                     replayed_linear, rmsnorm)
from alchemist_sgl.train.samples import PlannedSample, PlannedSegment
from alchemist_sgl.train.weights import BaseWeights

_PART_INDEX = {"q": 0, "k": 1, "v": 2, "o": 0, "gate": 0, "up": 1, "down": 0}


class _LayerLora:
    """One layer's LoRA pairs grouped by fused projection: A's concatenated once per forward."""

    def __init__(self, adapter: LoraAdapter | None, layer: int, is_training: bool,
                 dtype: torch.dtype) -> None:
        self.groups: dict[str, tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]] = {}
        if adapter is None:
            return
        self.scale, self.rank = adapter.scale, adapter.rank
        self.dropout = adapter.dropout if is_training else 0.0
        for proj in ("qkv", "o", "gate_up", "down"):
            pairs = adapter.pairs(layer, proj)
            if pairs:
                a = pairs[0][1] if len(pairs) == 1 else torch.cat([p[1] for p in pairs], dim=0)
                # fp32 master parameters, computed in the activation dtype (a no-op in fp32).
                self.groups[proj] = (a.to(dtype), [(_PART_INDEX[t], b.to(dtype)) for t, _, b in pairs])

    def add(self, proj: str, x: torch.Tensor, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """parts[i] += B_i @ A_i @ dropout(x) * scale for each pair of ``proj``; returns parts."""
        group = self.groups.get(proj)
        if group is None:
            return parts
        a, bs = group
        if self.dropout > 0.0:
            x = F.dropout(x, self.dropout, training=True)
        xa = F.linear(x, a) * self.scale  # [n, pairs * r]
        r = self.rank
        for j, (idx, b) in enumerate(bs):
            piece = xa if len(bs) == 1 else xa[:, j * r:(j + 1) * r]
            parts[idx] = parts[idx] + F.linear(piece, b)
        return parts


def _base(x: torch.Tensor, weight: torch.Tensor, seg: PlannedSegment, name: str,
          layer: int, capture: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
    rec = seg.replay.get(name)
    if rec is None:
        y = F.linear(x, weight)
    else:
        y = replayed_linear(x, rec[layer].to(x.device, non_blocking=True), weight)
    if capture is not None:
        capture.setdefault(name, []).append(y.detach())
    return y


def forward_logprobs(weights: BaseWeights, adapter: LoraAdapter | None, rope: RopeCache,
                     planned: PlannedSample, *,
                     gradient_mode: Literal["exact", "response_only"] = "exact",
                     is_training: bool = True,
                     capture: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
    """Log-probs [R] (fp32) of the response tokens given the prompt; differentiable w.r.t. the
    adapter when grad is enabled. ``adapter=None`` gives the base model. See Notes [Segments] and
    [Response-only gradients]. ``capture`` (single-segment plans only): receives, per projection
    name, one base output [T, out_dim] per layer, e.g. to make recordings where no server exists
    (``eval/gpu_check.py``; tests record from HF instead). Pure otherwise: no state is kept."""
    spec, device = weights.spec, weights.device
    eps, heads, kvh, hd = spec.rms_norm_eps, spec.heads, spec.kv_heads, spec.head_dim
    splits = [spec.q_size, spec.kv_size, spec.kv_size]
    f = spec.intermediate
    ids = planned.input_ids.to(device)
    segs = planned.segments
    p_len, total = planned.prompt_len, ids.numel()
    is_response_only = gradient_mode == "response_only"
    if gradient_mode not in ("exact", "response_only"):
        raise ValueError(f"unknown gradient_mode {gradient_mode!r}")
    if capture is not None and len(segs) != 1:
        raise ValueError("capture needs a single-segment plan")

    def grad_ctx(seg: PlannedSegment):
        if is_response_only and seg.end <= p_len:
            return torch.no_grad()
        return contextlib.nullcontext()

    hidden: list[torch.Tensor | None] = [None] * len(segs)
    residual: list[torch.Tensor | None] = [None] * len(segs)
    ropes = [rope.get(s.start, s.end) for s in segs]
    scale = hd ** -0.5
    for layer, lw in enumerate(weights.layers):
        lora = _LayerLora(adapter, layer, is_training, weights.dtype)
        qs, ks, vs = [], [], []
        for i, seg in enumerate(segs):
            n_tok = seg.end - seg.start
            with grad_ctx(seg):
                if layer == 0:
                    h = F.embedding(ids[seg.start:seg.end], weights.embed)
                    residual[i] = h
                    x = rmsnorm(h, lw.input_layernorm, eps)
                else:
                    x, residual[i] = add_rmsnorm(hidden[i], residual[i], lw.input_layernorm, eps)
                qkv = _base(x, lw.qkv, seg, "qkv", layer, capture)
                q, k, v = lora.add("qkv", x, list(qkv.split(splits, -1)))
                cos, sin = ropes[i]
                qs.append(apply_rope(q.view(n_tok, heads, hd), cos, sin))
                ks.append(apply_rope(k.view(n_tok, kvh, hd), cos, sin))
                vs.append(v.reshape(n_tok, kvh, hd))
        attn = _attention(qs, ks, vs, segs, scale, p_len if is_response_only else None)
        for i, seg in enumerate(segs):
            with grad_ctx(seg):
                (o,) = lora.add("o", attn[i], [_base(attn[i], lw.o, seg, "o", layer, capture)])
                x, residual[i] = add_rmsnorm(o, residual[i], lw.post_attention_layernorm, eps)
                gate_up = _base(x, lw.gate_up, seg, "gate_up", layer, capture)
                g, u = lora.add("gate_up", x, list(gate_up.split([f, f], -1)))
                m = F.silu(g) * u
                (hidden[i],) = lora.add("down", m, [_base(m, lw.down, seg, "down", layer, capture)])
    # Rows whose next token is a response token: absolute positions [P - 1, P + R - 1).
    h_rows, r_rows = [], []
    for i, seg in enumerate(segs):
        lo, hi = max(seg.start, p_len - 1), min(seg.end, total - 1)
        if lo < hi:
            h_rows.append(hidden[i][lo - seg.start:hi - seg.start])
            r_rows.append(residual[i][lo - seg.start:hi - seg.start])
    h = h_rows[0] if len(h_rows) == 1 else torch.cat(h_rows)
    r = r_rows[0] if len(r_rows) == 1 else torch.cat(r_rows)
    x, _ = add_rmsnorm(h, r, weights.final_norm, eps)
    logits = F.linear(x, weights.lm_head).float()
    return -F.cross_entropy(logits, ids[p_len:], reduction="none")


def _attention(qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor],
               segs: tuple[PlannedSegment, ...], scale: float,
               response_only_prompt_len: int | None) -> list[torch.Tensor]:
    """Joint causal attention over all segments; returns one [n_i, H*d] row block per segment."""

    def cat(ts: list[torch.Tensor]) -> torch.Tensor:
        return ts[0] if len(ts) == 1 else torch.cat(ts)

    sizes = [s.end - s.start for s in segs]
    if response_only_prompt_len is None:
        out = causal_attention(cat(qs), cat(ks), cat(vs), scale)
        return [out] if len(segs) == 1 else list(out.split(sizes))
    if len(segs) == 1:  # nothing before the response: response-only is exact here
        return [causal_attention(qs[0], ks[0], vs[0], scale)]
    # Response-only: the last segment is the response; the prompt's K/V are constants.
    with torch.no_grad():
        kp, vp = cat(ks[:-1]), cat(vs[:-1])
        prompt_out = list(causal_attention(cat(qs[:-1]), kp, vp, scale).split(sizes[:-1]))
    last = causal_attention(qs[-1], torch.cat([kp, ks[-1]]), torch.cat([vp, vs[-1]]), scale,
                            key_offset=segs[-1].start)
    return prompt_out + [last]
