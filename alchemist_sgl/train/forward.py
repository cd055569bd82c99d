"""The trainable forward of a Llama-family decoder over planned segments, with replay.

Owns ``forward_logprobs``: given frozen ``BaseWeights``, an optional ``LoraAdapter``, the optional
published ``FrozenLora`` and a ``PlannedSample`` (samples.py), returns the log-probability of every
response token under W0 + adapter, with the autograd graph to the adapter's parameters. Its
pieces, ``embed_segments`` / ``decoder_layer`` / ``head_logprobs``, are what the work units
(units.py) run one at a time: there is one copy of the layer code. Imports only torch.

Note [Segments]: the input [prompt | response] is split into planned segments; each keeps its own
hidden/residual tensors through every layer (no per-linear slice/cat of a joint tensor). For every
projection of every layer, a segment either takes the recorded base output through
``replayed_linear`` (exact input gradient, no matmul) or computes ``F.linear``; the LoRA branch,
norms, RoPE, SiLU*mul and residual adds are always computed. Attention is recomputed once per layer
over all segments jointly (their q/k/v concatenated, one causal SDPA, the output split back into
row views), so each segment attends to the K/V of all earlier ones. With one segment (replay off,
or nothing covered) nothing is concatenated: the recompute baseline is the same code path.

Note [Response-only gradients]: ``gradient_mode="response_only"`` splits the input at P - 1
(samples.py plans a segment boundary there). The prompt rows [0, P - 1) run without a graph and
their K/V are constants; the rows [P - 1, P + R), the prompt's last token and the response, run
with grad and attend to those constants plus their own causal K/V (a bottom-right causal mask).
Row P - 1 belongs to the grad part because its output is the label row of the first response
token: its hidden state depends on the adapter through its own projections, so leaving it
without a graph would drop that token's gradient. It is replayed when recorded, like any row.
The result is the gradient of the same loss with the K/V of prompt[:P - 1] held fixed, as a
KV-cached forward would give (cache built under no_grad, then [prompt[P - 1]] + response with
grad). It is an approximation of exact mode: what flows from the response loss back through
those prompt rows' activations into the adapter is dropped. The prompt is computed with the
current adapter (replayed base outputs where covered), not taken from SGLang's KV pool.

Note [Published adapter]: in merge mode the base tensors are the live served weights,
W_pub = cast(W0 + s * B_pub @ A_pub), with (A_pub, B_pub) the published adapter (``published``, a
``FrozenLora``; None means nothing is merged, W_pub = W0). Every target projection computes
    y = W_pub x + s*B(A x) - s*B_pub(A_pub x)
with (A_pub, B_pub) constants (no parameter grad) but the term still differentiable in x: value,
dx = (W_pub + sBA - sB_pub A_pub)^T g, dA and dB equal those of W0 x + s*BAx at any lag (fp32, to
rounding). The two LoRA terms are computed by identical ops, so when (A, B) == (A_pub, B_pub)
bitwise their difference is exactly zero and y == W_pub x bitwise. In that case (the trainer's
``is_published_current``: right after ``set_published(adapter.snapshot())``, until an optimizer
step or a load) the cheaper lag-0 form is used:
    y = W_pub x + (l(x_d) - l(x_d).detach()),   l(x) = s*B(A x),  x_d = x.detach()
value W_pub x, dx = W_pub^T g (= (W0 + sBA)^T g, because W_pub already holds sBA), dA and dB as
above. The input is detached inside l because W_pub's gradient already carries sBA; without the
detach it would be counted twice. A replayed segment (recorded W_pub x from the server) plugs in
the same way through ``replayed_linear``, so a lag-0 recording equals what the trainer computes.
With ``adapter=None`` the forward is y = W_pub x: the served weights as they are. Dropout breaks
the zero-value identity: the trainer refuses a published adapter when dropout > 0.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Literal

import torch
import torch.nn.functional as F

from alchemist_sgl.train.lora import FrozenLora, LoraAdapter
from alchemist_sgl.train.ops import (RopeCache, add_rmsnorm, apply_rope, causal_attention,
                                     replayed_linear, rmsnorm)
from alchemist_sgl.train.samples import PlannedSample, PlannedSegment
from alchemist_sgl.train.weights import BaseWeights

_PART_INDEX = {"q": 0, "k": 1, "v": 2, "o": 0, "gate": 0, "up": 1, "down": 0}
_Group = tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]  # (cat A [pairs*r, d_in], [(part, B)])


def _groups(adapter: LoraAdapter | FrozenLora, layer: int, dtype: torch.dtype) -> dict[str, _Group]:
    out: dict[str, _Group] = {}
    for proj in ("qkv", "o", "gate_up", "down"):
        pairs = adapter.pairs(layer, proj)
        if pairs:
            a = pairs[0][1] if len(pairs) == 1 else torch.cat([p[1] for p in pairs], dim=0)
            # fp32 master tensors, computed in the activation dtype (a no-op in fp32).
            out[proj] = (a.to(dtype), [(_PART_INDEX[t], b.to(dtype)) for t, _, b in pairs])
    return out


class _LayerLora:
    """One layer's LoRA correction per fused projection (Note [Published adapter]): the trained
    pairs' A's concatenated once per forward, and the published pairs' when the full form runs."""

    def __init__(self, adapter: LoraAdapter | None, layer: int, is_training: bool,
                 dtype: torch.dtype, published: FrozenLora | None = None,
                 is_published_current: bool = False) -> None:
        self.groups: dict[str, _Group] = {}
        self.published: dict[str, _Group] = {}
        self.is_lag0 = adapter is not None and published is not None and is_published_current
        if adapter is None:
            return
        self.scale, self.rank = adapter.scale, adapter.rank
        self.dropout = adapter.dropout if is_training else 0.0
        self.groups = _groups(adapter, layer, dtype)
        if published is not None and not self.is_lag0:
            if (published.rank, published.targets) != (adapter.rank, adapter.targets):
                raise ValueError("the published adapter must have the trained adapter's rank and targets")
            self.published = _groups(published, layer, dtype)

    def _deltas(self, group: _Group, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        a, bs = group
        xa = F.linear(x, a) * self.scale  # [n, pairs * r]
        r = self.rank
        return [(idx, F.linear(xa if len(bs) == 1 else xa[:, j * r:(j + 1) * r], b))
                for j, (idx, b) in enumerate(bs)]

    def add(self, proj: str, x: torch.Tensor, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """parts[i] += the correction of ``proj``'s pairs (x [n, d_in]); returns parts."""
        group = self.groups.get(proj)
        if group is None:
            return parts
        if self.is_lag0:  # value exactly 0; only the adapter's gradients
            if not torch.is_grad_enabled():
                return parts
            x = x.detach()
        if self.dropout > 0.0:
            x = F.dropout(x, self.dropout, training=True)
        deltas = self._deltas(group, x)
        pub = self.published.get(proj)
        if pub is not None:  # full form: + s*B(Ax) - s*B_pub(A_pub x), one difference per part
            for (idx, d), (_, dp) in zip(deltas, self._deltas(pub, x)):
                parts[idx] = parts[idx] + (d - dp)
            return parts
        for idx, d in deltas:
            parts[idx] = parts[idx] + ((d - d.detach()) if self.is_lag0 else d)
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


Streams = list[torch.Tensor | None]  # one [n_i, H] tensor per planned segment


def embed_segments(weights: BaseWeights, planned: PlannedSample) -> list[torch.Tensor]:
    """Layer 0's input: the embedding [n_i, H] of each segment (no grad: the base is frozen)."""
    ids = planned.input_ids.to(weights.device)
    return [F.embedding(ids[s.start:s.end], weights.embed) for s in planned.segments]


def decoder_layer(weights: BaseWeights, layer: int, lora: _LayerLora, planned: PlannedSample,
                  rope: RopeCache, hidden: Streams, residual: Streams, *,
                  is_response_only: bool = False,
                  capture: dict[str, list[torch.Tensor]] | None = None) -> tuple[Streams, Streams]:
    """One decoder layer over all segments (Note [Segments]), SGLang's two streams in and out:
    ``hidden`` [n_i, H] per segment, ``residual`` [n_i, H] per segment or None at layer 0 (the
    hidden input is then the embedding and becomes the residual). Returns new lists."""
    spec, lw, segs = weights.spec, weights.layers[layer], planned.segments
    eps, heads, kvh, hd = spec.rms_norm_eps, spec.heads, spec.kv_heads, spec.head_dim
    splits, f, p_len = [spec.q_size, spec.kv_size, spec.kv_size], spec.intermediate, planned.prompt_len

    def grad_ctx(seg: PlannedSegment) -> ContextManager[None]:  # Note [Response-only gradients]: constants before P - 1
        if is_response_only and seg.end <= p_len - 1:
            return torch.no_grad()
        return contextlib.nullcontext()

    hid, res = list(hidden), list(residual)
    qs, ks, vs = [], [], []
    for i, seg in enumerate(segs):
        n_tok, h, r = seg.end - seg.start, hid[i], res[i]
        assert h is not None  # a segment's hidden stream always holds a tensor
        with grad_ctx(seg):
            if r is None:
                res[i] = h
                x = rmsnorm(h, lw.input_layernorm, eps)
            else:
                x, res[i] = add_rmsnorm(h, r, lw.input_layernorm, eps)
            qkv = _base(x, lw.qkv, seg, "qkv", layer, capture)
            q, k, v = lora.add("qkv", x, list(torch.split(qkv, splits, -1)))
            cos, sin = rope.get(seg.start, seg.end)
            qs.append(apply_rope(q.view(n_tok, heads, hd), cos, sin))
            ks.append(apply_rope(k.view(n_tok, kvh, hd), cos, sin))
            vs.append(v.reshape(n_tok, kvh, hd))
    attn = _attention(qs, ks, vs, segs, hd ** -0.5, p_len if is_response_only else None)
    for i, seg in enumerate(segs):
        r = res[i]
        assert r is not None  # set by the first loop
        with grad_ctx(seg):
            (o,) = lora.add("o", attn[i], [_base(attn[i], lw.o, seg, "o", layer, capture)])
            x, res[i] = add_rmsnorm(o, r, lw.post_attention_layernorm, eps)
            gate_up = _base(x, lw.gate_up, seg, "gate_up", layer, capture)
            g, u = lora.add("gate_up", x, list(torch.split(gate_up, [f, f], -1)))
            m = F.silu(g) * u
            (hid[i],) = lora.add("down", m, [_base(m, lw.down, seg, "down", layer, capture)])
    return hid, res


def gather_rows(planned: PlannedSample, tensors: Streams, lo: int, hi: int,
                row0: int = 0) -> torch.Tensor:
    """Rows [lo, hi) of the model input (absolute positions) out of per-segment tensors, or of
    one tensor whose first row is row ``row0`` (graph replay's live rows: graph_layer.py)."""
    if len(tensors) == 1:  # one tensor over the whole input (joint layout or one segment)
        only = tensors[0]
        assert only is not None  # streams hold tensors after layer 0
        return only[lo - row0:hi - row0]
    rows = []
    for seg, t in zip(planned.segments, tensors):
        a, b = max(seg.start, lo), min(seg.end, hi)
        if a < b:
            assert t is not None  # streams hold tensors after layer 0
            rows.append(t[a - seg.start:b - seg.start])
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def head_logprobs(weights: BaseWeights, planned: PlannedSample, hidden: Streams, residual: Streams,
                  lo: int, hi: int, row0: int = 0) -> torch.Tensor:
    """Final add+RMSNorm, LM head and log-probs [hi - lo] (fp32) of the tokens at positions
    [lo + 1, hi + 1) from the rows [lo, hi); the response is rows [P - 1, P + R - 1).
    ``row0``: ``gather_rows``'s (one stream tensor starting at that row)."""
    ids = planned.input_ids.to(weights.device)
    x, _ = add_rmsnorm(gather_rows(planned, hidden, lo, hi, row0),
                       gather_rows(planned, residual, lo, hi, row0),
                       weights.final_norm, weights.spec.rms_norm_eps)
    logits = F.linear(x, weights.lm_head).float()
    return -F.cross_entropy(logits, ids[lo + 1:hi + 1], reduction="none")


def forward_logprobs(weights: BaseWeights, adapter: LoraAdapter | None, rope: RopeCache,
                     planned: PlannedSample, *,
                     gradient_mode: Literal["exact", "response_only"] = "exact",
                     is_training: bool = True,
                     capture: dict[str, list[torch.Tensor]] | None = None,
                     published: FrozenLora | None = None,
                     is_published_current: bool = False) -> torch.Tensor:
    """Log-probs [R] (fp32) of the response tokens given the prompt; differentiable w.r.t. the
    adapter when grad is enabled. ``adapter=None`` gives the base tensors as they are (W_pub).
    ``published``/``is_published_current``: Note [Published adapter]. See Notes [Segments] and
    [Response-only gradients]. ``capture`` (single-segment plans only): receives, per projection
    name, one base output [T, out_dim] per layer, e.g. to make recordings where no server exists
    (``eval/gpu_check.py``; tests record from HF instead). Pure otherwise: no state is kept."""
    if gradient_mode not in ("exact", "response_only"):
        raise ValueError(f"unknown gradient_mode {gradient_mode!r}")
    if capture is not None and len(planned.segments) != 1:
        raise ValueError("capture needs a single-segment plan")
    hidden: Streams = list(embed_segments(weights, planned))
    residual: Streams = [None] * len(hidden)
    for layer in range(weights.spec.layers):
        lora = _LayerLora(adapter, layer, is_training, weights.dtype, published, is_published_current)
        hidden, residual = decoder_layer(weights, layer, lora, planned, rope, hidden, residual,
                                         is_response_only=gradient_mode == "response_only",
                                         capture=capture)
    p_len = planned.prompt_len
    return head_logprobs(weights, planned, hidden, residual, p_len - 1, planned.input_ids.numel() - 1)


def _attention(qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor],
               segs: tuple[PlannedSegment, ...], scale: float,
               response_only_prompt_len: int | None) -> list[torch.Tensor]:
    """Joint causal attention over all segments; returns one [n_i, H*d] row block per segment."""

    def cat(ts: list[torch.Tensor]) -> torch.Tensor:
        return ts[0] if len(ts) == 1 else torch.cat(ts)

    sizes = [s.end - s.start for s in segs]
    if response_only_prompt_len is None:
        out = causal_attention(cat(qs), cat(ks), cat(vs), scale)
        return [out] if len(segs) == 1 else list(torch.split(out, sizes))
    # Response-only (Note [Response-only gradients]): the segments ending by P - 1 are constants.
    n_const = sum(1 for s in segs if s.end <= response_only_prompt_len - 1)
    if segs[n_const].start != response_only_prompt_len - 1:
        raise ValueError("response-only gradients need a segment boundary at P - 1 "
                         "(plan with is_response_separate=True)")
    if n_const == 0:  # a one-token prompt: nothing is constant, response-only is exact here
        out = causal_attention(cat(qs), cat(ks), cat(vs), scale)
        return [out] if len(segs) == 1 else list(torch.split(out, sizes))
    with torch.no_grad():
        kc, vc = cat(ks[:n_const]), cat(vs[:n_const])
        const_out = torch.split(causal_attention(cat(qs[:n_const]), kc, vc, scale), sizes[:n_const])
    grad_out = causal_attention(cat(qs[n_const:]), torch.cat([kc] + ks[n_const:]),
                                torch.cat([vc] + vs[n_const:]), scale,
                                key_offset=segs[n_const].start)
    tail = [grad_out] if len(segs) == n_const + 1 else list(torch.split(grad_out, sizes[n_const:]))
    return list(const_out) + tail
