"""The joint-layout trainable forward: one [T, H] tensor per layer, recorded row ranges replayed.

Owns ``joint_forward_logprobs``, the same contract as ``forward.forward_logprobs`` (exact gradients
only). Imports only torch.

Note [Joint layout]: the segment layout (forward.py, Note [Segments]) keeps one tensor per segment,
so every cheap op, every LoRA matmul and, in backward, every base input-gradient matmul runs once
per segment on fewer rows, and attention concatenates q/k/v. On CPU in bf16 (AMX), where a
100-row matmul costs a third of a 500-row one, that overhead exceeded what replay saved (measured
ratio 0.93 with SmolLM2, 400 + 100 tokens). The joint layout runs every op once over all rows,
exactly as the recompute baseline (which is this code with nothing recorded); only the four base
projections differ, through ``row_replayed_linear`` (ops.py, Note [Row-replayed linear]): one
output buffer, recorded rows copied in, other rows computed in place, one backward matmul. This
is not the measured-slow "slice rows out of a joint tensor and concatenate back" scheme: there
are no autograd slice/cat nodes, so no zero-filled gradient buffers and no extra backward copies;
the only added cost is one copy of the recorded rows per projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alchemist_sgl.train.forward import _LayerLora
from alchemist_sgl.train.lora import FrozenLora, LoraAdapter
from alchemist_sgl.train.ops import (RopeCache, add_rmsnorm, apply_rope, causal_attention,
                                     rmsnorm, row_replayed_linear)
from alchemist_sgl.train.samples import PlannedSample
from alchemist_sgl.train.spec import PROJECTIONS
from alchemist_sgl.train.weights import BaseWeights


def _ranges(planned: PlannedSample, name: str, layer: int, device: torch.device):
    """(start, end, recorded rows or None) tiling [0, T) for one projection of one layer."""
    out: list[tuple[int, int, torch.Tensor | None]] = []
    for seg in planned.segments:
        rec = seg.replay.get(name)
        rec = None if rec is None else rec[layer].to(device, non_blocking=True)
        if rec is None and out and out[-1][2] is None:
            out[-1] = (out[-1][0], seg.end, None)
        else:
            out.append((seg.start, seg.end, rec))
    return out


def joint_forward_logprobs(weights: BaseWeights, adapter: LoraAdapter | None, rope: RopeCache,
                           planned: PlannedSample, *, is_training: bool = True,
                           published: FrozenLora | None = None,
                           is_published_current: bool = False) -> torch.Tensor:
    """Log-probs [R] (fp32) of the response tokens; exact gradients. See Note [Joint layout];
    ``published`` as in forward.py, Note [Published adapter]."""
    spec, device = weights.spec, weights.device
    eps, heads, kvh, hd = spec.rms_norm_eps, spec.heads, spec.kv_heads, spec.head_dim
    splits, f = [spec.q_size, spec.kv_size, spec.kv_size], spec.intermediate
    ids = planned.input_ids.to(device)
    p_len, total = planned.prompt_len, ids.numel()
    cos, sin = rope.get(0, total)
    scale = hd ** -0.5
    h = F.embedding(ids, weights.embed)
    residual, hidden = h, None
    for layer, lw in enumerate(weights.layers):
        rows = {name: _ranges(planned, name, layer, device) for name in PROJECTIONS}
        lora = _LayerLora(adapter, layer, is_training, weights.dtype, published,
                          is_published_current)
        if layer == 0:
            x = rmsnorm(h, lw.input_layernorm, eps)
        else:
            x, residual = add_rmsnorm(hidden, residual, lw.input_layernorm, eps)
        qkv = row_replayed_linear(x, lw.qkv, rows["qkv"])
        q, k, v = lora.add("qkv", x, list(qkv.split(splits, -1)))
        q = apply_rope(q.view(total, heads, hd), cos, sin)
        k = apply_rope(k.view(total, kvh, hd), cos, sin)
        attn = causal_attention(q, k, v.reshape(total, kvh, hd), scale)
        (o,) = lora.add("o", attn, [row_replayed_linear(attn, lw.o, rows["o"])])
        x, residual = add_rmsnorm(o, residual, lw.post_attention_layernorm, eps)
        gate_up = row_replayed_linear(x, lw.gate_up, rows["gate_up"])
        g, u = lora.add("gate_up", x, list(gate_up.split([f, f], -1)))
        m = F.silu(g) * u
        (hidden,) = lora.add("down", m, [row_replayed_linear(m, lw.down, rows["down"])])
    lo, hi = p_len - 1, total - 1  # rows whose next token is a response token
    x, _ = add_rmsnorm(hidden[lo:hi], residual[lo:hi], weights.final_norm, eps)
    logits = F.linear(x, weights.lm_head).float()
    return -F.cross_entropy(logits, ids[p_len:], reduction="none")
