"""Percentiles and per-arm summaries of request records (pure; no I/O, no numpy needed).

Owns: ``percentile`` (linear interpolation, numpy's default method), ``summarize_requests``
which turns a list of ``RequestRecord`` dicts into the latency/throughput numbers every
experiment reports, and ``latency_samples`` which extracts the raw per-request series the report
plots as CDFs. Must not import the server runtime or sglang.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

PERCENTILES: tuple[int, ...] = (50, 90, 95, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) with linear interpolation; NaN for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(float(v) for v in values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def describe(values: Sequence[float], prefix: str) -> dict[str, float]:
    """``{prefix_mean, prefix_p50, prefix_p90, prefix_p95, prefix_p99}`` (NaN when empty)."""
    xs = [float(v) for v in values]
    out: dict[str, float] = {f"{prefix}_mean": (sum(xs) / len(xs)) if xs else math.nan}
    for q in PERCENTILES:
        out[f"{prefix}_p{q}"] = percentile(xs, q)
    return out


def _ok(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r.get("error") is None]


def latency_samples(records: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Raw per-request series of successful requests, in seconds: ttft_s, tpot_s, e2e_s, itl_s."""
    ok = _ok(records)
    return {
        "ttft_s": [r["ttft_s"] for r in ok if r.get("ttft_s") is not None],
        "tpot_s": [r["tpot_s"] for r in ok if r.get("tpot_s") is not None],
        "e2e_s": [r["e2e_s"] for r in ok if r.get("e2e_s") is not None],
        "itl_s": [x for r in ok for x in (r.get("itl_s") or [])],
    }


def summarize_requests(records: Sequence[Mapping[str, Any]], wall_s: float | None = None) -> dict[str, Any]:
    """Counts, throughput and latency percentiles of one run (or one arm).

    ``wall_s`` defaults to the span from the first request start to the last request end.
    Latencies are in milliseconds in the summary (``ttft_ms_p50`` ...); throughput in requests/s
    and output tokens/s over ``wall_s``. Failed requests count in ``failed_requests`` and are
    excluded from latencies.
    """
    ok = _ok(records)
    if wall_s is None:
        starts = [r["start_s"] for r in records if r.get("start_s") is not None]
        ends = [r["start_s"] + (r.get("e2e_s") or 0.0) for r in records if r.get("start_s") is not None]
        wall_s = (max(ends) - min(starts)) if starts else 0.0
    out_tokens = sum(int(r.get("output_tokens") or 0) for r in ok)
    in_tokens = sum(int(r.get("prompt_tokens") or 0) for r in ok)
    samples = latency_samples(records)
    summary: dict[str, Any] = {
        "requests": len(records),
        "completed_requests": len(ok),
        "failed_requests": len(records) - len(ok),
        "wall_s": wall_s,
        "request_throughput_rps": (len(ok) / wall_s) if wall_s > 0 else math.nan,
        "output_throughput_tps": (out_tokens / wall_s) if wall_s > 0 else math.nan,
        "prompt_tokens_total": in_tokens,
        "output_tokens_total": out_tokens,
    }
    for key in ("ttft", "tpot", "e2e", "itl"):
        summary.update(describe([v * 1000.0 for v in samples[f"{key}_s"]], f"{key}_ms"))
    return summary
