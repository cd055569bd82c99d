"""Where a training step's time goes: one profiled step, its operators sorted into six categories.

Owns the ``breakdown_ms_per_token`` fields of the ``replay`` experiment: ``MatmulDims`` (which
matmul shapes are base projections and which are LoRA), ``classify`` (one operator -> category,
pure), ``breakdown`` (per-category milliseconds per token from operator records, pure) and
``profile_breakdown`` (one step under ``torch.profiler``). Imports torch only.

Note [Step breakdown]: every operator's SELF time (its own time, children excluded) goes to one
category; ``autograd_other`` is the profiled step's wall time minus the other five, so the six
sum to the step (profiler overhead lands in ``autograd_other``).
  * ``gather``: replay's own work on recordings: everything under the trainer's read-out region
    (``alchemist::replay_readout``, the compiled layer's read-out of recorded rows) and the
    copies (``copy_``, ``index_select``, ``cat``) inside the replayed projections' forwards
    (``_RowReplayed``, ``_PrefixReplayed``, ``_Replayed``): the recorded rows copied from the
    store's pages into the projection outputs;
  * ``projections``: matmuls whose weight side is a base projection or the LM head, [d_in, d_out]
    in either order (forward x W^T and the input gradient g W);
  * ``lora``: the other matmuls with a dimension that is a multiple of the LoRA rank, up to 7
    (the A's of a fused projection are stacked: qkv's three, gate_up's two);
  * ``attention``: SDPA forward and backward (flash or math: softmax, bmm);
  * ``pointwise``: elementwise ops and reductions (RMSNorm, RoPE, SiLU * up, residual adds,
    casts, copies, the RoPE autograd function's own time) and a compiled graph's own time (its
    fused kernels; with ``train.compile`` the recorded-row copy of a replayed prefix is fused
    there too, so ``gather`` then counts the read-out from the store only);
  * ``autograd_other``: the rest: autograd engine, the loss, gradient accumulation, AdamW,
    Python between operators.
An operator under the optimizer, gradient accumulation or the loss goes to ``autograd_other``
whatever its name.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

CATEGORIES = ("gather", "projections", "attention", "pointwise", "lora", "autograd_other")
READOUT_REGION = "alchemist::replay_readout"  # alchemist_sgl/train/replay_rows.py READOUT_REGION
_REPLAY_FORWARDS = ("_RowReplayed", "_PrefixReplayed", "_Replayed")
_REPLAY_COPIES = ("aten::copy_", "aten::index_select", "aten::cat")
_OTHER_ANCESTORS = ("Optimizer.", "AccumulateGrad", "aten::cross_entropy_loss", "aten::nll_loss",
                    "aten::log_softmax", "LogSoftmaxBackward", "NllLossBackward")
_MATMULS = ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::_mkldnn_linear")
_ATTENTION = re.compile(r"scaled_dot_product|flash_attention|efficient_attention|aten::bmm|"
                        r"aten::baddbmm|aten::_softmax|aten::softmax|aten::_softmax_backward")
_POINTWISE = re.compile(
    r"^aten::(add|sub|mul|div|neg|silu|sigmoid|rsqrt|sqrt|pow|mean|sum|exp|copy|_to_copy|to|"
    r"clone|contiguous|cat|fill|zero|where|masked_fill|reciprocal|square|stack|empty_like|"
    r"clamp|maximum|minimum)(_backward|_)?$|^_Rope|CompiledFxGraph|cpp_fused|triton_")


@dataclass(frozen=True)
class MatmulDims:
    """The matmul shapes of one model: base projections (and LM head) and the LoRA rank."""

    projections: frozenset[tuple[int, int]]  # (d_in, d_out) and (d_out, d_in)
    rank: int

    @classmethod
    def from_spec(cls, spec: Any, rank: int) -> "MatmulDims":
        """From a ``LlamaSpec`` (alchemist_sgl/train/spec.py) and the LoRA rank."""
        h, q, kv, i = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, spec.intermediate
        pairs = {(h, q + 2 * kv), (q, h), (h, 2 * i), (i, h), (h, spec.vocab)}
        return cls(frozenset(pairs | {(b, a) for a, b in pairs}), rank)

    def matmul_kind(self, shapes: Sequence[Sequence[int] | None]) -> str | None:
        """"projections", "lora" or None for a matmul's input shapes: the first two consecutive
        2-D operands [a, b], [b, c] (mm, mm with ``out``, addmm after its bias)."""
        mats = [tuple(s) if s is not None and len(s) == 2 else None for s in shapes]
        pair = next(((m, n) for m, n in zip(mats, mats[1:])
                     if m is not None and n is not None and m[1] == n[0]), None)
        if pair is None:
            return None
        (a, b), (_, c) = pair
        if (b, c) in self.projections:
            return "projections"
        if self.rank > 0 and any(d % self.rank == 0 and d <= 7 * self.rank for d in (a, b, c)):
            return "lora"
        return None


@dataclass(frozen=True)
class OpRecord:
    """One profiled operator: name, self milliseconds, input shapes, ancestor names (innermost
    first)."""

    name: str
    self_ms: float
    shapes: tuple = ()
    ancestors: tuple[str, ...] = ()


def classify(op: OpRecord, dims: MatmulDims) -> str:
    """The category of ``op``'s self time (Note [Step breakdown])."""
    names = (op.name, *op.ancestors)
    if any(n == READOUT_REGION for n in names):
        return "gather"
    if any(p in a for a in names for p in _OTHER_ANCESTORS):
        return "autograd_other"
    if op.name in _REPLAY_COPIES and any(a in _REPLAY_FORWARDS for a in op.ancestors):
        return "gather"
    if op.name in _MATMULS:
        shapes = op.shapes
        if op.name.endswith("linear") and len(shapes) >= 2 and shapes[1]:  # weight [d_out, d_in]
            shapes = (shapes[0], tuple(reversed(shapes[1])))
        return dims.matmul_kind(shapes) or "autograd_other"
    if _ATTENTION.search(op.name):
        return "attention"
    if _POINTWISE.search(op.name):
        return "pointwise"
    return "autograd_other"


def breakdown(ops: Sequence[OpRecord], step_ms: float, tokens: int, dims: MatmulDims
              ) -> dict[str, float]:
    """Milliseconds per token per category; ``autograd_other`` takes what the other five leave
    of ``step_ms`` (never below 0)."""
    if tokens < 1 or step_ms <= 0:
        raise ValueError(f"need tokens >= 1 and step_ms > 0 (got {tokens}, {step_ms})")
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for op in ops:
        kind = classify(op, dims)
        if kind != "autograd_other":
            totals[kind] += op.self_ms
    totals["autograd_other"] = max(0.0, step_ms - sum(totals.values()))
    return {k: v / tokens for k, v in totals.items()}


def replay_overhead_share(per_token: dict[str, float]) -> float:
    """``gather`` over the whole step (Note [Step breakdown])."""
    total = sum(per_token.values())
    return per_token["gather"] / total if total > 0 else 0.0


def _records(events: Any) -> list[OpRecord]:
    out = []
    for e in events:
        ancestors, parent = [], e.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        out.append(OpRecord(e.name, e.self_cpu_time_total / 1000.0,
                            tuple(tuple(s) if isinstance(s, (list, tuple)) else None
                                  for s in (e.input_shapes or ())), tuple(ancestors)))
    return out


def profile_breakdown(step: Callable[[], Any], tokens: int, dims: MatmulDims, steps: int = 1,
                      after: Callable[[], Any] = lambda: None) -> dict[str, Any]:
    """Runs ``step`` ``steps`` times under ``torch.profiler`` (CPU, shapes recorded; ``after``
    between them, e.g. to restore the trainer) and keeps the fastest (the least disturbed by
    other work on the machine): ``{"ms_per_token": breakdown, "profiled_step_s": its wall time,
    "profiled_steps_s": every one}``."""
    from torch.profiler import ProfilerActivity, profile

    best: tuple[float, list[OpRecord]] | None = None
    walls = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            step()
            seconds = time.perf_counter() - t0
        after()
        walls.append(seconds)
        if best is None or seconds < best[0]:
            best = (seconds, _records(prof.events()))
    assert best is not None, "steps must be >= 1"
    return {"ms_per_token": breakdown(best[1], best[0] * 1000.0, tokens, dims),
            "profiled_step_s": best[0], "profiled_steps_s": walls}
