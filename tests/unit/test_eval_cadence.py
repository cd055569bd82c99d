"""The cadence experiment's pure parts (eval/experiments/cadence.py)."""

from __future__ import annotations

from eval.experiments import cadence


def test_cell_duration_covers_several_rounds() -> None:
    assert cadence.cell_duration_s(15.0, True) == cadence.MIN_CELL_S[True]
    assert cadence.cell_duration_s(120.0, True) == 300.0
    assert cadence.cell_duration_s(120.0, False) == 480.0


def test_publish_times_and_delay_to_the_next_publish() -> None:
    rows = [{"t": 0.0, "version": "v1"}, {"t": 1.0, "version": "v1"}, {"t": 2.0, "version": "v2"},
            {"t": 3.0, "version": "v2"}, {"t": 4.0, "version": "v3"}]
    pubs = cadence.publish_times(rows)
    assert pubs == [2.0, 4.0]
    assert cadence.to_next_publish_s([0.5, 2.5, 4.5], pubs) == [1.5, 1.5]  # the last: none after


def test_cell_numbers_shares() -> None:
    summary = {"samples_trained_by_lag": {"0": 6, "1": 3, "2": 1}, "lag0_share_samples": 0.6,
               "prompt_tokens_by_fate": {"lag0": 300, "approximate": 100, "stale_recomputed": 50,
                                         "hole": 50, "evicted": 0},
               "reuse_by_lag": {"0": 300}, "radix_hit_rate": 0.4, "ttft_p50": 100.0, "ttft_p95": 300.0,
               "samples_trained_per_s": 0.2, "rounds": 3, "samples_trained": 10}
    cell = cadence.cell_numbers(summary, [10.0, 30.0, 20.0])
    assert cell["lag0_share_tokens"] == 0.6 and cell["lag_le1_share"] == 0.9
    assert cell["feedback_to_publish_s_p50"] == 20.0 and cell["samples_per_s"] == 0.2
    assert cadence.cell_numbers(summary, [])["feedback_to_publish_s_p50"] is None
