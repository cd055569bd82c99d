"""Pure arithmetic of the ``replay`` experiment: FLOPs shares, gradient comparisons, field assembly.

Owns what the benchmark computes from its measurements (no timing, no servers, no models):
``prompt_fractions`` (the FLOPs and token shares replay removes), ``lora_flops_per_token``,
``cosine`` and ``max_rel_err`` over named gradient tensors, ``ceiling_ratios``,
``forward_seconds`` (a step's forward time from its gradient-accumulation events) and
``plan_fields`` (one plan's JSON fields). Imports torch and ``alchemist_sgl.core.plan`` only.

Note [FLOPs share]: ``prompt_fraction`` f = forward FLOPs replay avoids over the replayed prompt
rows / forward FLOPs of every row trained. The denominator is the whole training forward of
prompt + response: the four base projections, attention at the sample's length (mean causal
span), the elementwise ops (all three from ``forward_flops_per_token`` in core/plan.py), the
LoRA branch on every target (trained, so always computed) and the LM head on the loss rows only
(the R rows [P - 1, P + R - 1)). The numerator takes core/plan.py's figures for the n replayed
rows [0, n): ``RecordPlan.prompt_forward_flops_avoided(n)`` times ``forward_flops_per_token(n)``
per row. For a projection plan that product is the replayed projections' FLOPs per token (the
per-projection arithmetic lives in one place); for the graph plan (ratio 1.0) it is the whole
forward of those rows: projections, attention over their own causal spans (mean (n + 1) / 2) and
the elementwise ops. The graph plan's n is P - 1 (the last prompt row is computed with the
response, samples.py ``plan_sample``): the caller passes the trainer's own planned count.
"""

from __future__ import annotations

import statistics
from typing import Any, Mapping, Sequence

import torch

from alchemist_sgl.core.plan import ModelShape, RecordPlan, forward_flops_per_token

_TARGET_DIMS = {  # target -> (d_in, d_out) as functions of the shape
    "q": lambda s: (s.hidden, s.heads * s.head_dim),
    "k": lambda s: (s.hidden, s.kv_heads * s.head_dim),
    "v": lambda s: (s.hidden, s.kv_heads * s.head_dim),
    "o": lambda s: (s.heads * s.head_dim, s.hidden),
    "gate": lambda s: (s.hidden, s.intermediate),
    "up": lambda s: (s.hidden, s.intermediate),
    "down": lambda s: (s.intermediate, s.hidden),
}


def lora_flops_per_token(shape: ModelShape, rank: int, targets: Sequence[str]) -> int:
    """Forward FLOPs of the LoRA branches (x A^T then (.) B^T) per token, all layers."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    unknown = [t for t in targets if t not in _TARGET_DIMS]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown} (known: {sorted(_TARGET_DIMS)})")
    per_layer = sum(2 * rank * sum(_TARGET_DIMS[t](shape)) for t in targets)
    return shape.layers * per_layer


def prompt_fractions(shape: ModelShape, tensors: Sequence[str], samples: Sequence[tuple[int, int, int]],
                     vocab: int, rank: int, targets: Sequence[str]) -> tuple[float, float]:
    """(f by FLOPs, f by tokens) over ``samples`` = (prompt_len, response_len, replayed_tokens).

    See Note [FLOPs share]. ``tensors``: the plan's names (projections, or core/plan.py's
    ``GRAPH_TENSORS``)."""
    plan = RecordPlan(shape, tuple(tensors), page_tokens=16)
    lora = lora_flops_per_token(shape, rank, targets)
    replayed = total = 0.0
    tokens = replayed_tokens = 0
    for p, r, n in samples:
        if p < 1 or r < 1 or not 0 <= n <= p:
            raise ValueError(f"bad sample sizes: prompt {p}, response {r}, replayed {n}")
        length = p + r
        per_token = forward_flops_per_token(shape, length)
        if tensors and n:
            replayed += n * plan.prompt_forward_flops_avoided(n) * forward_flops_per_token(shape, n)
        total += length * (per_token + lora) + r * 2 * shape.hidden * vocab
        tokens += length
        replayed_tokens += n
    if tokens == 0:
        raise ValueError("no samples")
    return replayed / total, replayed_tokens / tokens


def cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Cosine between two gradients given as same-named tensors (all names, flattened, in fp64)."""
    if set(a) != set(b) or not a:
        raise ValueError(f"gradients name different tensors: {sorted(set(a) ^ set(b))[:4]}")
    dot = na = nb = 0.0
    for k in a:
        x, y = a[k].double().reshape(-1), b[k].double().reshape(-1)
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    if na == 0.0 or nb == 0.0:
        raise ValueError("a zero gradient has no direction")
    return dot / (na ** 0.5 * nb ** 0.5)


def max_rel_err(grads: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> tuple[float, int]:
    """(max over tensors of ||g - r|| / ||r||, tensors compared); tensors whose reference is exactly
    zero are skipped (a fresh adapter's A gradients), every reference tensor must be present."""
    missing = sorted(set(ref) - set(grads))
    if missing:
        raise ValueError(f"gradients missing for {missing[:4]}")
    worst, compared = 0.0, 0
    for k, r in ref.items():
        rn = float(r.double().norm())
        if rn == 0.0:
            continue
        worst = max(worst, float((grads[k].double() - r.double()).norm()) / rn)
        compared += 1
    if compared == 0:
        raise ValueError("every reference gradient is zero")
    return worst, compared


def ceiling_ratios(recompute_s: Sequence[float], substituted_s: Sequence[float], share: float) -> list[float]:
    """Per repetition T_rec / (T_rec - (T_rec - T_sub) * share): ``substituted_s`` are recompute
    steps with the plan's projections precomputed on EVERY row; ``share`` = the fraction of those
    projection rows replay substitutes (prompt rows / all rows: matmul time is linear in rows)."""
    if len(recompute_s) != len(substituted_s) or not recompute_s:
        raise ValueError("one substituted step per recompute step")
    return [c / (c - (c - s) * share) for c, s in zip(recompute_s, substituted_s)]


def forward_seconds(start: float, events: Sequence[float], n_samples: int) -> float:
    """Forward time of a step from its gradient-accumulation event times.

    Each sample's backward accumulates every adapter parameter once, so the events come in
    ``n_samples`` equal bursts; a sample's forward runs from the end of the previous burst (the
    step's start for the first) to the first event of its own burst. That span includes the LM
    head's backward into the last layer (it accumulates no adapter gradient) and the planning at
    the step's start: a small overestimate, the same for every step it is applied to."""
    if n_samples < 1 or not events or len(events) % n_samples:
        raise ValueError(f"{len(events)} events do not split into {n_samples} equal bursts")
    per = len(events) // n_samples
    ev = sorted(events)
    total = ev[0] - start
    for k in range(1, n_samples):
        total += ev[k * per] - ev[k * per - 1]
    return total


def ratio_stats(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float]:
    """(median, max - min) of per-repetition ratios numerator / denominator."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError("one denominator per numerator")
    ratios = [n / d for n, d in zip(numerators, denominators)]
    return statistics.median(ratios), max(ratios) - min(ratios)


def plan_fields(*, tokens: int, times: Mapping[str, Sequence[float]], forward_share: float,
                fractions: tuple[float, float], ceiling: Sequence[float] | str | None,
                errors: tuple[float, float], peak: tuple[int | None, int | None],
                stale: Mapping[int, float]) -> dict[str, Any]:
    """One plan's fields (docs/results.md ``replay``). ``times``: ``replay`` and ``recompute`` step
    seconds per repetition (same repetitions); ``errors``: (replay, recompute) max rel errors;
    ``ceiling``: per-repetition ceiling ratios (``ceiling_ratios``), or ``"ideal"``: the plan has
    no substitution arm (the graph plan removes the whole forward of its rows, not a set of
    projection outputs) and its ``ceiling_ratio`` is its ``ideal_ratio``; ``ceiling_source``
    says which."""
    ratio, spread = ratio_stats(times["recompute"], times["replay"])
    f, f_tokens = fractions
    ideal = 1.0 / (1.0 - forward_share * f)
    if isinstance(ceiling, str):
        if ceiling != "ideal":
            raise ValueError(f"ceiling {ceiling!r}: per-repetition ratios, 'ideal' or None")
        ceiling_ratio: float | None = ideal
    else:
        ceiling_ratio = statistics.median(ceiling) if ceiling else None
    source = "ideal_ratio" if isinstance(ceiling, str) else ("substituted_rows" if ceiling else None)
    return {
        "tokens_per_s_replay": tokens / statistics.median(times["replay"]),
        "tokens_per_s_recompute": tokens / statistics.median(times["recompute"]),
        "ratio": ratio, "ratio_spread": spread,
        "prompt_fraction": f, "prompt_fraction_tokens": f_tokens,
        "forward_share": forward_share,
        "ideal_ratio": ideal,
        "ceiling_ratio": ceiling_ratio, "ceiling_source": source,
        "max_grad_rel_err": errors[0], "max_grad_rel_err_recompute": errors[1],
        "peak_mem_replay_bytes": peak[0], "peak_mem_recompute_bytes": peak[1],
        "stale_grad_cos_by_lag": {str(k): v for k, v in sorted(stale.items())},
        "repetitions": len(times["replay"]),
        "step_s_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }
