"""The cheap ops of a Llama decoder layer in SGLang's order and rounding, and the replayed linear.

Owns: ``rmsnorm`` / ``add_rmsnorm`` (SGLang ``RMSNorm.forward_native``), ``RopeCache`` + ``apply_rope``
(SGLang ``RotaryEmbedding.forward_native``, neox style), ``replayed_linear`` (a recorded base output
injected into the graph with the exact input gradient) and ``causal_attention``. Imports only torch.

Note [SGLang rounding]: ``RMSNorm.forward_native`` upcasts to fp32, adds the residual in fp32, keeps
the rounded sum as the next residual but normalises the fp32 sum, and multiplies by the weight
BEFORE casting back (HF casts first). The residual travels separately from the layer output
(``forward_batch.residual_stream``): layer 0 normalises the embedding and keeps it as the residual;
every later norm is fused add+norm of (previous sublayer output, residual). RoPE: SGLang on CPU
casts its fp32 cos/sin cache to the model dtype and computes ``x1*cos - x2*sin``, ``x2*cos + x1*sin``
in that dtype on the first and second halves (neox). In fp32 all of this equals HF up to rounding.

Note [Replayed linear]: y = x @ W.T with W frozen. When y was recorded during serving, the forward
returns the recording and the backward returns dL/dx = dL/dy @ W, exactly what ``F.linear``'s
backward gives; nothing is saved but a reference to W. The recording must come from the same W and
the same x (Note [Staleness] in samples.py), in the compute dtype.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

# One row range's source in ``row_replayed_linear``: a recording [rows, d_out], a function that
# writes those rows into the view it is given (a store ``PagedRows``), or None (computed).
RowSource = torch.Tensor | Callable[[torch.Tensor], object] | None
RowRanges = list[tuple[int, int, RowSource]]  # (start, end, source), tiling [0, T)


class AutogradCtx(Protocol):
    """The ``ctx`` torch hands a custom autograd function's forward and backward (torch types it
    as Any): the two members these functions use."""

    @property
    def saved_tensors(self) -> tuple[torch.Tensor, ...]: ...

    def save_for_backward(self, *tensors: torch.Tensor) -> None: ...


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """SGLang RMSNorm without residual. x [T, H] any float dtype; returns x's dtype."""
    orig = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * weight).to(orig)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang fused add+RMSNorm: returns (norm(x + residual), x + residual rounded to x's dtype)."""
    orig = x.dtype
    xf = x.float() + residual.float()
    new_residual = xf.to(orig)
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * weight).to(orig), new_residual


class RopeCache:
    """cos/sin tables [max_positions, head_dim/2] computed in fp32 as SGLang does, then cast to
    ``dtype`` once (SGLang on CPU keeps the cache in the model dtype). Grows on demand."""

    def __init__(self, head_dim: int, theta: float, dtype: torch.dtype, device: torch.device | str,
                 max_positions: int = 4096) -> None:
        self.head_dim, self.theta, self.dtype, self.device = head_dim, theta, dtype, device
        self._build(max_positions)

    def _build(self, n: int) -> None:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float)
                                         / self.head_dim))
        t = torch.arange(n, dtype=torch.float)
        freqs = torch.einsum("i,j -> ij", t, inv_freq)
        self.cos = freqs.cos().to(device=self.device, dtype=self.dtype)
        self.sin = freqs.sin().to(device=self.device, dtype=self.dtype)

    def get(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions [start, end), shaped [n, 1, head_dim/2] (views, no copy)."""
        if end > self.cos.shape[0]:
            self._build(max(end, 2 * self.cos.shape[0]))
        return self.cos[start:end].unsqueeze(1), self.sin[start:end].unsqueeze(1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class _Rope(torch.autograd.Function):
    """Neox RoPE with a hand-written backward (the transpose rotation): saves only cos/sin."""

    @staticmethod
    def forward(ctx: AutogradCtx, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rope(x, cos, sin)

    @staticmethod
    def backward(ctx: AutogradCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        g1, g2 = torch.chunk(grad, 2, dim=-1)
        return torch.cat((g1 * cos + g2 * sin, g2 * cos - g1 * sin), dim=-1), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, heads, head_dim] (may be a strided view) -> rotated, contiguous, same dtype."""
    if torch.is_grad_enabled() and x.requires_grad:
        out: torch.Tensor = _Rope.apply(x, cos, sin)  # type: ignore[no-untyped-call]  # torch: apply is unannotated
        return out
    return _rope(x, cos, sin)


class _Replayed(torch.autograd.Function):
    """Note [Replayed linear]: forward returns the recording, backward dL/dx = dL/dy @ W."""

    @staticmethod
    def forward(ctx: AutogradCtx, x: torch.Tensor, recorded: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return recorded.view_as(recorded)

    @staticmethod
    def backward(ctx: AutogradCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return grad.matmul(weight), None, None


def replayed_linear(x: torch.Tensor, recorded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ weight.T with y taken from ``recorded`` [n, d_out]; x [n, d_in]. Shapes/dtypes must
    match (checked: a wrong recording is a caller bug, not something to train on)."""
    if recorded.shape != (x.shape[0], weight.shape[0]) or recorded.dtype != x.dtype:
        raise ValueError(f"recording {tuple(recorded.shape)} {recorded.dtype} does not fit input "
                         f"{tuple(x.shape)} {x.dtype} and weight {tuple(weight.shape)}")
    if torch.is_grad_enabled() and x.requires_grad:
        out: torch.Tensor = _Replayed.apply(x, recorded, weight)  # type: ignore[no-untyped-call]  # torch: apply is unannotated
        return out
    return recorded


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     key_offset: int = 0, is_gqa: bool | None = None) -> torch.Tensor:
    """Grouped-query causal attention. q [n, H, d], k/v [m, KV, d] with m = key_offset + n: query
    row i sits at absolute position key_offset + i and sees keys [0, key_offset + i].
    ``is_gqa``: KV < H, if the caller knows it as a plain bool (under torch.compile with dynamic
    shapes the head counts are symbolic). Returns [n, H*d]."""
    n, heads, d = q.shape
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    gqa = bool(kh.shape[1] != heads) if is_gqa is None else is_gqa
    if key_offset == 0:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                             enable_gqa=gqa)
    else:
        rows = torch.arange(n, device=q.device).unsqueeze(1) + key_offset
        mask = torch.arange(k.shape[0], device=q.device).unsqueeze(0) <= rows
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                             enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1).reshape(n, heads * d)


class _RowReplayed(torch.autograd.Function):
    """Note [Row-replayed linear]: y = x @ W.T over a joint [T, d_in] input where some row ranges
    were recorded. Forward writes each range into one output buffer: recorded rows are copied,
    the others computed with a matmul straight into their rows (no autograd slice/cat nodes).
    Backward is ONE matmul over all rows, dL/dx = dL/dy @ W, which is the exact gradient for
    recorded and computed rows alike (W is frozen)."""

    @staticmethod
    def forward(ctx: AutogradCtx, x: torch.Tensor, weight: torch.Tensor,
                ranges: RowRanges) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _row_replayed_nograd(x, weight, ranges)

    @staticmethod
    def backward(ctx: AutogradCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return grad.matmul(weight), None, None


def row_replayed_linear(x: torch.Tensor, weight: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    """x [T, d_in] -> [T, d_out]; ``ranges`` tile [0, T): (start, end, recording [end - start,
    d_out] in x's dtype, a function that writes those rows into the [end - start, d_out] view
    it is given, or None to compute). See Note [Row-replayed linear]."""
    if all(rec is None for _, _, rec in ranges):
        return F.linear(x, weight)
    if torch.is_grad_enabled() and x.requires_grad:
        out: torch.Tensor = _RowReplayed.apply(x, weight, ranges)  # type: ignore[no-untyped-call]  # torch: apply is unannotated
        return out
    return _row_replayed_nograd(x, weight, ranges)


def _row_replayed_nograd(x: torch.Tensor, weight: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    out = x.new_empty(x.shape[0], weight.shape[0])
    for start, end, rec in ranges:
        if rec is None:
            torch.matmul(x[start:end], weight.t(), out=out[start:end])
        elif callable(rec):
            rec(out[start:end])
        else:
            out[start:end].copy_(rec, non_blocking=True)
    return out
