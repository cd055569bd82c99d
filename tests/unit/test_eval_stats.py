"""Percentiles and request summaries."""

from __future__ import annotations

import math
import random

import pytest

from eval.loadgen.stats import percentile, summarize_requests


def test_percentile_matches_linear_interpolation() -> None:
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 100) == 5.0
    assert percentile(xs, 25) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([1.0, 2.0], 90) == pytest.approx(1.9)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_percentile_agrees_with_numpy() -> None:
    import numpy as np  # installed with torch: missing, this test fails instead of skipping
    rng = random.Random(3)
    xs = [rng.expovariate(1.0) for _ in range(257)]
    for q in (1, 50, 90, 95, 99):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def _rec(start: float, ttft: float, e2e: float, out: int, error: str | None = None) -> dict:
    return {"start_s": start, "ttft_s": ttft, "e2e_s": e2e, "output_tokens": out, "prompt_tokens": 10,
            "tpot_s": (e2e - ttft) / (out - 1) if out > 1 else None, "itl_s": [0.01] * (out - 1), "error": error}


def test_summary_counts_failures_and_excludes_them_from_latency() -> None:
    recs = [_rec(0.0, 0.1, 1.1, 11), _rec(1.0, 0.2, 1.2, 11), _rec(2.0, 50.0, 60.0, 0, error="boom")]
    s = summarize_requests(recs, wall_s=4.0)
    assert (s["requests"], s["completed_requests"], s["failed_requests"]) == (3, 2, 1)
    assert s["ttft_ms_p50"] == pytest.approx(150.0)
    assert s["tpot_ms_p50"] == pytest.approx(100.0)
    assert s["output_tokens_total"] == 22
    assert s["request_throughput_rps"] == pytest.approx(0.5)
    assert s["output_throughput_tps"] == pytest.approx(5.5)
    assert s["ttft_ms_p50"] <= s["ttft_ms_p95"] <= s["ttft_ms_p99"]


def test_summary_wall_defaults_to_request_span() -> None:
    s = summarize_requests([_rec(1.0, 0.1, 1.0, 2), _rec(2.0, 0.1, 2.0, 2)])
    assert s["wall_s"] == pytest.approx(3.0)
