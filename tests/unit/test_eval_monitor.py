"""Throughput timeline binning and the process/load sampler (no server)."""

from __future__ import annotations

import os
import time



from eval.monitor import Monitor, environment, merge_timelines, throughput_timeline


def test_throughput_timeline_bins_completions() -> None:
    recs = [{"start_s": 0.1, "e2e_s": 0.5, "output_tokens": 4, "error": None},
            {"start_s": 0.5, "e2e_s": 0.6, "output_tokens": 6, "error": None},
            {"start_s": 1.0, "e2e_s": 1.5, "output_tokens": 8, "error": None},
            {"start_s": 0.0, "e2e_s": 9.0, "output_tokens": 0, "error": "boom"}]
    rows = throughput_timeline(recs, bin_s=1.0)
    assert rows == [{"t_s": 1.0, "request_rps": 1.0, "output_tps": 4.0},
                    {"t_s": 2.0, "request_rps": 1.0, "output_tps": 6.0},
                    {"t_s": 3.0, "request_rps": 1.0, "output_tps": 8.0}]
    assert throughput_timeline(recs, bin_s=2.0)[0] == {"t_s": 2.0, "request_rps": 1.0, "output_tps": 5.0}
    assert throughput_timeline([]) == []


def _wait_until(condition, timeout_s: float = 30.0) -> None:
    """Polls ``condition`` (the monitor samples in its own thread) until true; fails at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the monitor took no samples"
        time.sleep(0.01)


def test_monitor_samples_a_process_tree() -> None:
    with Monitor(os.getpid(), interval_s=0.05) as mon:
        _wait_until(lambda: len(mon.samples) >= 3)
    assert len(mon.samples) >= 3
    assert all(s["rss_bytes"] > 0 and s["load1"] >= 0 for s in mon.samples)
    assert [s["t_s"] for s in mon.samples] == sorted(s["t_s"] for s in mon.samples)
    merged = merge_timelines([{"t_s": 0.15, "output_tps": 1.0}], mon.samples)
    assert [r["t_s"] for r in merged] == sorted(r["t_s"] for r in merged) and len(merged) == len(mon.samples) + 1


def test_monitor_without_pid_or_status_route_only_has_load() -> None:
    with Monitor(None, interval_s=0.05, status_url="http://127.0.0.1:9") as mon:  # nothing listens on 9
        _wait_until(lambda: len(mon.samples) >= 2)
    assert len(mon.samples) >= 2 and all(set(s) == {"t_s", "load1"} for s in mon.samples)


def test_environment_names_packages() -> None:
    env = environment()
    assert env["packages"]["openai"] and env["cpu_count"] >= 1
