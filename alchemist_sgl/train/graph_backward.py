"""A decoder layer's backward for recorded prompt rows, written out from recorded tensors.

Owns ``GraphRecording`` (what the forward must keep per layer for graph replay; graph_layer.py
wires it into the step), ``GraphLora`` (one layer's LoRA tensors as the backward reads them), ``LayerGrads`` and
``layer_backward``: the gradient at the layer input and every LoRA A/B gradient from the recording,
the frozen base weights and the gradient at the layer's two outputs. Imports only torch and lower
train/ modules (ops, spec, weights); never layer.py, which may call it.

Note [Graph backward]: the layer (layer.py's ``_core``) is, with s1 the fused add's sum,
    s1 = h + r;  x1 = rms(s1) w1;  q|k|v = x1 Wqkv^T + lora;  q, k = rope(q, k)
    a = attn(q, k, v);  s2 = (a Wo^T + lora) + s1;  x2 = rms(s2) w2;  g|u = x2 Wgu^T + lora
    h' = (silu(g) u) Wd^T + lora;  outputs (h', s2)
and its backward needs, per row, exactly: s1 and its reciprocal std, q and k after RoPE, v, a
and the per-head log-sum-exp of the softmax, s2 and its reciprocal std, g and u (all after
their LoRA corrections). ``layer_backward`` runs no forward op of the layer: no base projection
x W^T, no P V product, no norm or RoPE forward; x1, x2 and silu(g) u are rebuilt elementwise
from the recording. The products it runs are the backward's own: dy W per base projection, the
attention backward (P = exp(q k^T scale - lse) per block of query rows, as FlashAttention's
backward recomputes it; dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)), dQ = dS K scale,
dK = dS^T Q scale) and the rank-r LoRA activations x A^T, which dB needs and which a merged
server never computes (r columns per pair, a few percent of a base projection).

Note [Prompt and response rows]: a sample's prompt rows are followed by response rows that
attend to them. Prompt queries see only prompt keys (causal), so the prompt rows' attention
backward is self-contained, but the response rows' loss also reaches the prompt's k and v.
That part comes from the response rows' normal autograd path (their queries against the
prompt's recorded k/v as leaves) and enters here as ``dk_extra`` / ``dv_extra`` [P, KV, d],
gradients w.r.t. k after RoPE and v of the prompt positions, added before the RoPE and qkv
backwards. LoRA gradients of the two parts add up to the whole sample's. The response rows'
forward reads of the prompt only its k (after RoPE) and v per layer, both recorded here. The
last prompt row is the label row of the first response token (forward.py's ``head_logprobs``
reads rows [P - 1, P + R - 1)), so its final hidden state is needed: the caller treats
[0, P - 1) as the recorded rows and runs row P - 1 with the response rows.

Size: per token and layer 2H + 2 q_size + 2 kv_size + 2F elements in the compute dtype and
2 + heads fp32 statistics (``GraphRecording.bytes_per_token``); for SmolLM2 5760 elements,
1.11x the four projections' outputs (5184), and it replaces them for the recorded rows.
(The name: replay_rows.py's ``LayerRecording`` is the projections' recorded rows.)

Exactness: in fp32 the result equals autograd through layer.py to rounding (tests). In bf16
every product runs in the compute dtype, P, the norms and the dK/dV sums in fp32; s1 and s2 are
the rounded sums (the forward normalised the unrounded fp32 ones), so x1 and x2 are rebuilt to
within that rounding; on one tiny layer the error is within 2x bf16 autograd's own (test).
LoRA dropout cannot be replayed (its masks are not recorded): ``GraphLora`` has no dropout and
the caller must not use graph replay with one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alchemist_sgl.train.spec import PROJECTIONS, LlamaSpec
from alchemist_sgl.train.weights import LayerWeights

Tensors = tuple[tuple[torch.Tensor, ...], ...]  # per projection: one tensor per LoRA pair

# GraphRecording's tensors: (name, elements per token as a function of the spec, stored in fp32).
_FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("s1", "hidden", False), ("rstd1", "1", True), ("q", "q_size", False),
    ("k", "kv_size", False), ("v", "kv_size", False), ("attn", "q_size", False),
    ("lse", "heads", True), ("s2", "hidden", False), ("rstd2", "1", True),
    ("gate", "intermediate", False), ("up", "intermediate", False))


@dataclass(frozen=True)
class GraphRecording:
    """One layer's recorded rows [n] (Note [Graph backward]), compute dtype unless noted:
    s1 [n, H] the input sum (layer 0: the embedding), rstd1 [n, 1] fp32, q [n, heads, d] and
    k [n, kv_heads, d] after RoPE, v [n, kv_heads, d], attn [n, heads*d] (before o_proj),
    lse [n, heads] fp32 (natural log-sum-exp of the scaled causal scores), s2 [n, H] the
    post-attention residual, rstd2 [n, 1] fp32, gate and up [n, F] (after LoRA)."""

    s1: torch.Tensor
    rstd1: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn: torch.Tensor
    lse: torch.Tensor
    s2: torch.Tensor
    rstd2: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor

    def check(self, spec: LlamaSpec, dtype: torch.dtype) -> int:
        """The number of rows; ValueError unless every tensor has that many rows, the shape
        ``spec`` gives it and the compute ``dtype`` (statistics: fp32): a caller bug."""
        rows = self.s1.shape[0]
        for name, dim, is_fp32 in _FIELDS:
            t: torch.Tensor = getattr(self, name)
            n = 1 if dim == "1" else int(getattr(spec, dim))
            want_dtype = torch.float32 if is_fp32 else dtype
            is_bad_dim = t.dim() != (3 if name in ("q", "k", "v") else 2)
            if is_bad_dim or t.shape[0] != rows or t.shape[1:].numel() != n or t.dtype != want_dtype:
                raise ValueError(f"graph recording '{name}' is {tuple(t.shape)} {t.dtype}; "
                                 f"expected {rows} rows of {n} elements, {want_dtype}")
        return rows

    def first_rows(self, n: int) -> "GraphRecording":
        """The recording of rows [0, n) (views): exact, as causal rows never see later ones."""
        return GraphRecording(**{name: getattr(self, name)[:n] for name, _, _ in _FIELDS})

    @staticmethod
    def bytes_per_token(spec: LlamaSpec, element_size: int) -> int:
        """Bytes one token's recording holds in one layer (times ``spec.layers`` for the model);
        ``element_size`` of the compute dtype (fp32 statistics are 4 bytes regardless)."""
        total = 0
        for _, dim, is_fp32 in _FIELDS:
            n = 1 if dim == "1" else int(getattr(spec, dim))
            total += n * (4 if is_fp32 else element_size)
        return total


@dataclass(frozen=True)
class GraphLora:
    """One layer's LoRA as the backward reads it, per projection (PROJECTIONS order): the parts
    of the fused output each pair adds to (forward.py's ``_PART_INDEX``), trained A [r, d_in]
    and B [d_out, r], and the published ones for the full form (forward.py, Note [Published
    adapter]; empty otherwise). ``is_lag0``: the input gradient carries no LoRA term."""

    rank: int
    scale: float
    parts: tuple[tuple[int, ...], ...]
    a: Tensors
    b: Tensors
    pa: Tensors = ((), (), (), ())
    pb: Tensors = ((), (), (), ())
    is_lag0: bool = False


@dataclass(frozen=True)
class LayerGrads:
    """``d_input``: the gradient at s1 [n, H], which is both the hidden and the residual input's
    gradient (layer 0: the embedding's); ``da`` / ``db``: per projection, per pair, in the
    adapter tensors' dtype."""

    d_input: torch.Tensor
    da: Tensors
    db: Tensors


def _normed(s: torch.Tensor, rstd: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (s.float() * rstd * w).to(s.dtype)


def _rmsnorm_backward(s: torch.Tensor, rstd: torch.Tensor, w: torch.Tensor,
                      dy: torch.Tensor) -> torch.Tensor:
    """d/ds of (s rstd(s) w), weight frozen, in fp32 as the forward normalises."""
    sh = s.float() * rstd
    gy = dy.float() * w.float()
    return (rstd * (gy - sh * (gy * sh).mean(dim=-1, keepdim=True))).to(s.dtype)


def _rope_backward(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transpose rotation of ops.py's neox ``_rope``."""
    g1, g2 = torch.chunk(g, 2, dim=-1)
    return torch.cat((g1 * cos + g2 * sin, g2 * cos - g1 * sin), dim=-1)


def _silu_mul_backward(g: torch.Tensor, u: torch.Tensor, silu_g: torch.Tensor,
                       dm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) of m = silu(g) u, with ``silu_g`` = silu(g) from rebuilding m: ATen's fused SiLU
    backward (dy sigma(g) (1 + g (1 - sigma(g))), one pass) instead of its seven elementwise ops."""
    return torch.ops.aten.silu_backward(dm * u, g), dm * silu_g


def _cat(ts: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    return (ts[0] if len(ts) == 1 else torch.cat(ts, dim=0)).to(dtype)


def _lora_term(x: torch.Tensor, dparts: list[torch.Tensor], idx: tuple[int, ...],
               a_list: tuple[torch.Tensor, ...], b_list: tuple[torch.Tensor, ...], rank: int,
               scale: float) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One LoRA sum s*B(A x) per part: (its input gradient, dA's, dB's)."""
    a = _cat(a_list, x.dtype)
    xa = F.linear(x, a) * scale  # [n, pairs * r]: the rank-r activations dB needs
    dxa = torch.cat([dparts[i].matmul(b.to(x.dtype)) for i, b in zip(idx, b_list)], dim=-1)
    dxa = dxa * scale
    da_all = dxa.t().matmul(x)
    da = [da_all[j * rank:(j + 1) * rank].to(a_list[j].dtype) for j in range(len(a_list))]
    db = [dparts[i].t().matmul(xa[:, j * rank:(j + 1) * rank]).to(b_list[j].dtype)
          for j, i in enumerate(idx)]
    return dxa.matmul(a), da, db


def _linear_backward(k: int, x: torch.Tensor, dparts: list[torch.Tensor], weight: torch.Tensor,
                     lora: GraphLora | None) -> tuple[torch.Tensor, list[torch.Tensor],
                                                      list[torch.Tensor]]:
    """Projection k (PROJECTIONS order), y = x W^T + LoRA, base frozen: (dx, dA's, dB's)."""
    dy = dparts[0] if len(dparts) == 1 else torch.cat(dparts, dim=-1)
    dx = dy.matmul(weight)
    if lora is None or not lora.parts[k]:
        return dx, [], []
    idx = lora.parts[k]
    dx_l, da, db = _lora_term(x, dparts, idx, lora.a[k], lora.b[k], lora.rank, lora.scale)
    if lora.is_lag0:
        return dx, da, db
    dx = dx + dx_l
    if lora.pa[k]:
        dx_p, _, _ = _lora_term(x, dparts, idx, lora.pa[k], lora.pb[k], lora.rank, lora.scale)
        dx = dx - dx_p
    return dx, da, db


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, d_out: torch.Tensor, scale: float,
                       block_rows: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal GQA attention backward over n rows from q [n, H, d], k/v [n, KV, d], out and d_out
    [n, H*d], lse [n, H] (Note [Graph backward]); head h reads kv head h // (H/KV), as SDPA's
    ``enable_gqa``. P is rebuilt per block of ``block_rows`` query rows. Returns dq, dk, dv."""
    n, heads, d = q.shape
    kvh = k.shape[1]
    grp = heads // kvh
    qh = q.reshape(n, kvh, grp, d).permute(1, 2, 0, 3)  # [KV, G, n, d]
    do = d_out.reshape(n, kvh, grp, d).permute(1, 2, 0, 3)
    delta = (do.float() * out.reshape(n, kvh, grp, d).permute(1, 2, 0, 3).float()).sum(-1)
    lse_h = lse.reshape(n, kvh, grp).permute(1, 2, 0)  # [KV, G, n]
    kh, vh = k.permute(1, 0, 2), v.permute(1, 0, 2)  # [KV, n, d]
    dq = torch.empty_like(qh)
    dk = torch.zeros(kvh, n, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    future = torch.ones(block_rows, block_rows, dtype=torch.bool, device=q.device).triu(1)
    for i0 in range(0, n, block_rows):
        i1 = min(n, i0 + block_rows)
        b = i1 - i0
        qb = qh[:, :, i0:i1].reshape(kvh, grp * b, d)
        dob = do[:, :, i0:i1].reshape(kvh, grp * b, d)
        kb, vb = kh[:, :i1], vh[:, :i1]
        s = torch.matmul(qb, kb.transpose(1, 2)).float().view(kvh, grp, b, i1) * scale
        p = torch.exp(s - lse_h[:, :, i0:i1, None].float())  # future keys: the diagonal block
        p[..., i0:].masked_fill_(future[:b, :b], 0.0)
        dp = torch.matmul(dob, vb.transpose(1, 2)).float().view(kvh, grp, b, i1)
        ds = (p * (dp - delta[:, :, i0:i1, None])).view(kvh, grp * b, i1).to(q.dtype)
        pc = p.view(kvh, grp * b, i1).to(q.dtype)
        dv[:, :i1] += torch.matmul(pc.transpose(1, 2), dob).float()
        dq[:, :, i0:i1] = (torch.matmul(ds, kb) * scale).view(kvh, grp, b, d)
        dk[:, :i1] += (torch.matmul(ds.transpose(1, 2), qb) * scale).float()
    dq_rows = dq.permute(2, 0, 1, 3).reshape(n, heads, d)
    return dq_rows, dk.to(q.dtype).permute(1, 0, 2), dv.to(q.dtype).permute(1, 0, 2)


@torch.no_grad()
def layer_backward(rec: GraphRecording, lw: LayerWeights, lora: GraphLora | None,
                   cos: torch.Tensor, sin: torch.Tensor, grad_hidden: torch.Tensor,
                   grad_residual: torch.Tensor, *, dk_extra: torch.Tensor | None = None,
                   dv_extra: torch.Tensor | None = None, block_rows: int = 64) -> LayerGrads:
    """The layer's backward over the recorded rows [n] (Note [Graph backward]). ``cos``/``sin``:
    ops.py's ``RopeCache.get`` for the rows' positions; ``grad_hidden`` / ``grad_residual``
    [n, H]: the gradient at the layer's two outputs; ``dk_extra`` / ``dv_extra`` [n, KV, d]: the
    later rows' share (Note [Prompt and response rows])."""
    n, heads, hd = rec.q.shape
    kvh = rec.k.shape[1]
    silu_g = F.silu(rec.gate)
    dm, da3, db3 = _linear_backward(3, silu_g * rec.up, [grad_hidden], lw.down, lora)
    dg, du = _silu_mul_backward(rec.gate, rec.up, silu_g, dm)
    x2 = _normed(rec.s2, rec.rstd2, lw.post_attention_layernorm)
    dx2, da2, db2 = _linear_backward(2, x2, [dg, du], lw.gate_up, lora)
    ds2 = _rmsnorm_backward(rec.s2, rec.rstd2, lw.post_attention_layernorm, dx2) + grad_residual
    d_attn, da1, db1 = _linear_backward(1, rec.attn, [ds2], lw.o, lora)
    dq, dk, dv = attention_backward(rec.q, rec.k, rec.v, rec.attn, rec.lse, d_attn, hd ** -0.5,
                                    block_rows)
    if dk_extra is not None:
        dk = dk + dk_extra
    if dv_extra is not None:
        dv = dv + dv_extra
    dq = _rope_backward(dq, cos, sin).reshape(n, heads * hd)
    dk = _rope_backward(dk, cos, sin).reshape(n, kvh * hd)
    x1 = _normed(rec.s1, rec.rstd1, lw.input_layernorm)
    dx1, da0, db0 = _linear_backward(0, x1, [dq, dk, dv.reshape(n, kvh * hd)], lw.qkv, lora)
    ds1 = _rmsnorm_backward(rec.s1, rec.rstd1, lw.input_layernorm, dx1) + ds2
    assert len(PROJECTIONS) == 4  # the four (da, db) above, in PROJECTIONS order
    return LayerGrads(ds1, (tuple(da0), tuple(da1), tuple(da2), tuple(da3)),
                      (tuple(db0), tuple(db1), tuple(db2), tuple(db3)))
