"""The ``spike`` experiment's pure parts (burst profile, status trace, resumed-after, clock origin,
publish windows and the split of requests by them, field assembly) and its block alternation on a
fake server and a fake ``ctx`` (no HTTP, no model)."""

from __future__ import annotations

import copy
import json
import math
import random
import threading
import time
from typing import Any

import pytest

import eval.loadgen.ab as ab_module
from eval.cli import _clean
from eval.experiments import _spike_trace as tr
from eval.experiments import discover, spike
from eval.loadgen.arrivals import arrival_times
from eval.loadgen.runner import LoadResult
from eval.loadgen.workloads import Conversation

SPIKE_FIELDS = ("ttft_p95_serving_only", "ttft_p95_with_training", "ratio", "failed_requests",
                "train_steps_during_run", "train_resumed_after_s", "requests_per_arm")


# ------------------------------------------------------------------------------------------ profile
def test_profile_puts_one_burst_between_two_base_rate_spans() -> None:
    p = tr.SpikeProfile(base_rps=0.5, pre_s=60.0, burst_s=10.0, burst_rps=6.0, post_s=80.0)
    assert (p.burst_start_s, p.burst_end_s, p.duration_s) == (60.0, 70.0, 150.0)
    assert p.expected_requests() == pytest.approx(0.5 * 140 + 60)
    assert [p.phase(t) for t in (0.0, 59.9, 60.0, 69.9, 70.0, 149.0)] == ["pre", "pre", "burst", "burst",
                                                                          "post", "post"]
    spec = p.arrivals()
    assert spec.rate_at(30.0) == 0.5 and spec.rate_at(65.0) == 6.0 and spec.rate_at(100.0) == 0.5
    times = arrival_times(spec, 10_000, p.duration_s, seed=3)
    counts = {ph: sum(1 for t in times if p.phase(t) == ph) for ph in tr.PHASES}
    # per second of each phase, the burst sends several times the base rate
    assert counts["burst"] / 10.0 > 3 * (counts["pre"] + counts["post"]) / 140.0
    assert max(times) < p.duration_s


def test_profile_refuses_a_burst_no_faster_than_the_base() -> None:
    with pytest.raises(ValueError, match="burst_rps"):
        tr.SpikeProfile(1.0, 10.0, 5.0, 1.0, 10.0)
    with pytest.raises(ValueError):
        tr.SpikeProfile(1.0, -1.0, 5.0, 4.0, 10.0)


def test_full_run_sends_at_least_300_requests_per_arm_for_the_default_seed() -> None:
    p = spike.FULL
    prof = tr.SpikeProfile(p["base_rps"], p["pre_s"], p["burst_s"], p["burst_rps"], p["post_s"])
    sent = sum(len(arrival_times(prof.arrivals(), 100_000, prof.duration_s, seed=r)) for r in range(p["rounds"]))
    assert sent >= p["min_requests"] == 300


# ------------------------------------------------------------------------------------------ trace
def test_trace_row_reads_the_sections_and_tolerates_missing_ones() -> None:
    status = {"weight_version": "v4", "arbiter": {"state": "YIELDING", "transitions": 3, "reason": "waiting",
                                                  "is_spike": True},
              "train": {"steps": 7, "units_run": 120, "samples_pending": 5, "paused": False},
              "publish": {"publishes": 4}}
    row = tr.trace_row(status, 12.5)
    assert row == {"t": 12.5, "state": "YIELDING", "transitions": 3.0, "reason": "waiting", "is_spike": True,
                   "steps": 7.0, "units_run": 120.0, "pending": 5.0, "paused": False, "publishes": 4.0,
                   "weight_version": "v4"}
    bare = tr.trace_row({"weight_version": "v0"}, 1.0)
    assert bare["state"] is None and bare["steps"] is None and bare["transitions"] is None


def _rows(spec: list[tuple[float, str | None, int, int]]) -> list[dict[str, Any]]:
    return [{"t": t, "state": s, "units_run": u, "steps": st, "transitions": None, "reason": None}
            for t, s, u, st in spec]


def test_resumed_after_measures_from_the_burst_end_to_units_running_again() -> None:
    # burst [10, 20): yields at 12, pauses, TRAINING again at 24 with no unit yet, units at 25, step at 27
    rows = _rows([(8, "TRAINING", 10, 1), (12, "YIELDING", 11, 1), (16, "PAUSED", 11, 1), (20, "PAUSED", 11, 1),
                  (24, "TRAINING", 11, 1), (25, "TRAINING", 14, 1), (27, "TRAINING", 20, 2)])
    got = tr.resumed_after(rows, 10.0, 20.0)
    assert got == {"yielded": True, "yield_seen_at_s": 10.0, "state_resumed_after_s": 4.0,
                   "resumed_after_s": 5.0, "step_after_s": 7.0}


def test_resumed_after_takes_the_last_yield_inside_the_burst_and_may_be_negative() -> None:
    rows = _rows([(11, "YIELDING", 5, 0), (13, "TRAINING", 6, 0), (15, "YIELDING", 6, 0),
                  (17, "TRAINING", 6, 0), (18, "TRAINING", 9, 0)])
    got = tr.resumed_after(rows, 10.0, 20.0)
    assert got["yield_seen_at_s"] == 5.0  # the poll at 15, not the first yield at 11
    assert got["state_resumed_after_s"] == -3.0 and got["resumed_after_s"] == -2.0
    assert got["step_after_s"] is None


def test_resumed_after_with_a_yield_seen_only_after_the_burst_or_never() -> None:
    late = _rows([(15, "TRAINING", 1, 0), (21, "YIELDING", 1, 0), (23, "TRAINING", 2, 0)])
    assert tr.resumed_after(late, 10.0, 20.0)["resumed_after_s"] == 3.0
    calm = _rows([(5, "TRAINING", 1, 0), (15, "TRAINING", 2, 1), (25, "TRAINING", 3, 1)])
    assert tr.resumed_after(calm, 10.0, 20.0) == {"yielded": False, "yield_seen_at_s": None,
                                                  "state_resumed_after_s": None, "resumed_after_s": None,
                                                  "step_after_s": None}
    stuck = _rows([(12, "YIELDING", 1, 0), (22, "PAUSED", 1, 0)])
    got = tr.resumed_after(stuck, 10.0, 20.0)
    assert got["yielded"] is True and got["resumed_after_s"] is None
    no_arbiter = _rows([(12, None, 1, 0), (14, None, 2, 0)])
    assert tr.resumed_after(no_arbiter, 10.0, 20.0)["yielded"] is False


def test_state_changes_and_shifted_rows() -> None:
    rows = _rows([(1, "TRAINING", 0, 0), (2, "YIELDING", 0, 0), (3, "YIELDING", 0, 2), (4, "TRAINING", 0, 5)])
    assert [(c["t_s"], c["from"], c["to"]) for c in tr.state_changes(rows)] == [(2, "TRAINING", "YIELDING"),
                                                                               (4, "YIELDING", "TRAINING")]
    assert tr.shifted(rows, 1.0)[0]["t"] == 0.0 and rows[0]["t"] == 1


# ------------------------------------------------------------------------------------------ clock, publishes
def test_clock_origin_is_the_median_handover_minus_the_request_end() -> None:
    origin = 1_700_000_000.0
    recs = [{"completion_id": f"c{i}", "start_s": float(i), "e2e_s": 2.0, "error": None} for i in range(5)]
    jitter = [0.001, 0.002, 0.003, 0.5, 0.002]  # one slow hand-over does not move the median
    stamps = {f"c{i}": origin + i + 2.0 + j for i, j in enumerate(jitter)}
    recs.append({"completion_id": "bad", "start_s": 0.0, "e2e_s": 1.0, "error": "boom"})
    stamps["bad"] = origin + 999.0
    assert tr.clock_origin(recs, stamps) == pytest.approx(origin + 0.002)
    assert tr.clock_origin(recs, {}) is None


def test_publish_windows_span_the_stall_and_the_whole_publish_before_the_mint() -> None:
    origin = 1000.0
    versions = [{"name": "v3", "created_at": 999.0, "state": "retired"},  # before the block
                {"name": "v4", "created_at": 1010.0, "state": "retired"},
                {"name": "v5", "created_at": 1020.0, "state": "rejected"},  # never served
                {"name": "v6", "created_at": 1030.0, "state": "serving"}]
    recent = {"v4": {"stall_ms": 50.0, "publish_ms": 1500.0}}
    got = tr.publish_windows(versions, recent, origin, 1100.0)
    assert [w["version"] for w in got] == ["v4", "v6"]
    assert got[0]["stall"] == pytest.approx((9.95, 10.0)) and got[0]["publish"] == pytest.approx((8.5, 10.0))
    assert got[1]["stall"] == (30.0, 30.0) and got[1]["stall_ms"] is None


def test_split_by_windows_uses_the_wait_for_the_first_token() -> None:
    recs = [{"start_s": 0.0, "ttft_s": 0.5, "error": None},    # waits [0, 0.5]: clear of [1, 1.1]
            {"start_s": 0.8, "ttft_s": 0.3, "error": None},    # [0.8, 1.1]: overlaps
            {"start_s": 1.12, "ttft_s": 0.2, "error": None},   # starts 0.02 s after the span: the margin
            {"start_s": 2.0, "ttft_s": 0.1, "error": None},
            {"start_s": 1.0, "ttft_s": None, "error": "boom"}]
    inside, outside = tr.split_by_windows(recs, [(1.0, 1.1)], margin_s=0.05)
    assert inside == [recs[1], recs[2]] and outside == [recs[0], recs[3]]
    inside, _ = tr.split_by_windows(recs, [(1.0, 1.1)])
    assert inside == [recs[1]]
    assert tr.ttft_ms(recs[:4], 50) == pytest.approx(250.0)
    assert math.isnan(tr.ttft_ms([])) and math.isnan(tr.ratio(1.0, 0.0)) and tr.ratio(3.0, 2.0) == 1.5


def test_stamping_sink_notes_every_completion_and_forwards_only_with_a_sink() -> None:
    seen: list[str] = []
    fed = spike.StampingSink(sink=seen.append)
    off = spike.StampingSink()
    assert fed.body("c1", "x", random.Random(0)) is None and off.body("c2", "x", random.Random(0)) is None
    assert seen == ["c1"] and set(fed.stamps) == {"c1"} and set(off.stamps) == {"c2"}


# ------------------------------------------------------------------------------------------ assembly
def _block(arm: str, label: str, ttfts: list[float], resume: float | None, steps: float,
           windows: list[dict[str, Any]] = ()) -> dict[str, Any]:
    recs = [{"start_s": float(i), "scheduled_s": float(i), "ttft_s": t, "error": None} for i, t in enumerate(ttfts)]
    return {"arm": arm, "label": label, "records": recs, "rows": [], "windows": list(windows),
            "resume": {"yielded": resume is not None, "yield_seen_at_s": 1.0, "state_resumed_after_s": resume,
                       "resumed_after_s": resume, "step_after_s": None},
            "steps": steps, "transitions": 2.0 if arm == "on" else 1.0, "poll_errors": 0, "clock_aligned": True,
            "timeline": [{"t_s": 1.0, "train_steps": steps}]}


def test_assemble_reports_the_interfaces_fields_and_publishes_apart() -> None:
    prof = tr.SpikeProfile(1.0, 2.0, 2.0, 5.0, 2.0)
    win = {"version": "v2", "at_s": 5.0, "stall_ms": 30.0, "publish_ms": 900.0, "stall": (4.97, 5.0),
           "publish": (4.1, 5.0)}
    blocks = [_block("off", "off#0", [0.1] * 6, None, 0.0),
              _block("on", "on#0", [0.1, 0.1, 0.1, 0.1, 0.2, 0.9], 3.0, 4.0, [win]),
              _block("on", "on#1", [0.1] * 6, 5.0, 2.0),
              _block("off", "off#1", [0.1] * 6, None, 0.0)]
    blocks[3]["records"].append({"start_s": 9.0, "ttft_s": None, "error": "boom"})
    got = spike.assemble(blocks, prof, {"min_requests": 0})
    for key in SPIKE_FIELDS:
        assert key in got, key
    assert got["ttft_p95_serving_only"] == pytest.approx(100.0)
    on = sorted([100.0] * 10 + [200.0, 900.0])
    assert got["ttft_p95_with_training"] == pytest.approx(tr.ttft_ms([{"ttft_s": x / 1000} for x in on]))
    assert got["ratio"] == pytest.approx(got["ttft_p95_with_training"] / 100.0)
    assert got["failed_requests"] == 1 and got["requests_per_arm"] == 12
    assert got["train_steps_during_run"] == 6.0 and got["train_steps_while_serving_only"] == 0.0
    assert got["train_resumed_after_s"] == 5.0  # the longest of the with-training bursts
    assert got["arbiter_transitions"] == {"serving_only": 2.0, "with_training": 4.0}
    assert got["arbiter_yielded_every_burst"] is True
    # on#0's requests 4 (waits [4, 4.2]) and 5 ([5, 5.9]) overlap the publish; only 5 the stall
    assert got["publishes_during_run"] == 1 and got["publish_stall_ms_median"] == 30.0
    assert got["requests_overlapping_publish"] == 2 and got["requests_overlapping_publish_stall"] == 1
    assert got["ttft_p95_clear_of_publish"] == pytest.approx(100.0) and got["ratio_clear_of_publish"] == 1.0
    assert got["ttft_p95_by_phase"]["with_training"]["post"] == pytest.approx(tr.ttft_ms(
        [{"ttft_s": t} for t in (0.2, 0.9, 0.1, 0.1)]))  # send times >= 4 s
    assert set(got["per_block"]) == {"off#0", "on#0", "on#1", "off#1"} and "notes" not in got
    json.dumps(_clean(got), allow_nan=False)


def test_assemble_notes_a_burst_without_a_resume_and_too_few_requests() -> None:
    prof = tr.SpikeProfile(1.0, 2.0, 2.0, 5.0, 2.0)
    got = spike.assemble([_block("off", "off#0", [0.1] * 3, None, 0.0), _block("on", "on#0", [0.1] * 3, None, 1.0)],
                         prof, {"min_requests": 300})
    assert got["train_resumed_after_s"] is None and got["arbiter_yielded_every_burst"] is False
    assert len(got["notes"]) == 2 and "only 3 requests per arm" in got["notes"][1]


# ------------------------------------------------------------------------------------------ orchestration
class FakeServer:
    """/alchemist/status with an arbiter the fake load drives; counts polls; trains while resumed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.paused, self.state, self.polls = False, "TRAINING", 0
        self.train = {"steps": 0, "units_run": 0, "samples_pending": 0}
        self.arbiter = {"state": "TRAINING", "transitions": 0, "is_enabled": True}
        self.controls: list[str] = []
        self.fed: list[str] = []

    def status(self, url: str, timeout_s: float = 30.0) -> dict[str, Any]:
        with self.lock:
            self.polls += 1
            if not self.paused and self.arbiter["state"] == "TRAINING":
                self.train["units_run"] += 1
            return {"weight_version": "v0", "train": dict(copy.deepcopy(self.train), paused=self.paused),
                    "arbiter": dict(self.arbiter), "publish": {"publishes": 0, "recent": []}, "versions": []}

    def control(self, url: str, action: str, timeout_s: float = 60.0) -> None:
        self.controls.append(action)
        self.paused = action == "pause"

    def post(self, samples: list[dict]) -> tuple[int, Any]:
        assert not self.paused, "samples are fed during with-training blocks only"
        with self.lock:
            self.fed.extend(s["completion_id"] for s in samples)
            self.train["steps"] += 1
        return 200, {"accepted": len(samples)}

    def set_state(self, state: str) -> None:
        with self.lock:
            self.arbiter = dict(self.arbiter, state=state, transitions=self.arbiter["transitions"] + 1)

    def wait_polls(self, n: int) -> None:
        with self.lock:
            target = self.polls + n
        deadline = time.monotonic() + 30.0
        while self.polls < target:
            assert time.monotonic() < deadline, f"the experiment polled {self.polls} times, not {target}"
            time.sleep(0.005)


class FakeCtx:
    seed = 0
    quick = True
    smoke = False
    url = None

    def __init__(self, server: FakeServer) -> None:
        self.srv = server
        self.last_timeline: list[dict[str, float]] = []

    def workload(self, min_turns: int = 2) -> list[Conversation]:
        return [Conversation(f"c{i}", ("hi", "more")) for i in range(10)]

    def load(self, url: str, convs: Any, spec: Any, feedback: Any = None, poll_status: bool = False) -> LoadResult:
        t0 = time.time()
        self.srv.wait_polls(2)
        self.srv.set_state("YIELDING")  # the burst: the arbiter yields in both arms
        self.srv.wait_polls(3)
        self.srv.set_state("TRAINING")
        self.srv.wait_polls(3)
        span = time.time() - t0
        # every request ran the whole session and is handed over as it ends: the origin is t0
        records = [{"index": i, "start_s": 0.0, "scheduled_s": 0.0, "ttft_s": 0.01, "e2e_s": span,
                    "completion_id": f"{spec.label}-{i}", "error": None} for i in range(6)]
        for r in records:
            feedback.body(r["completion_id"], "text", random.Random(0))
        return LoadResult(spec.label, records, span, 6, None)


def test_spike_alternates_arms_feeds_only_with_training_and_sees_the_resume(monkeypatch) -> None:
    srv = FakeServer()
    monkeypatch.setattr(spike, "get_status", srv.status)
    monkeypatch.setattr(spike, "train_control", srv.control)
    monkeypatch.setattr(ab_module, "flush_cache", lambda url: 1)
    # the burst spans the whole fake session, so the yield and the resume both fall inside it
    p = dict(spike.QUICK, rounds=2, poll_s=0.005, pre_s=0.0, burst_s=1000.0, post_s=0.0)
    got = spike.measure(FakeCtx(srv), "http://fake", p, post=srv.post)
    assert got["block_order"] == ["off", "on", "on", "off"]
    assert srv.controls == ["pause", "resume", "pause", "resume", "pause", "resume"]  # last: left as found
    assert sorted(srv.fed) == sorted(f"on#{r}-{i}" for r in range(2) for i in range(6))
    assert got["failed_requests"] == 0 and got["requests_per_arm"] == 12
    assert got["train_steps_during_run"] >= 1 and got["train_steps_while_serving_only"] == 0
    assert got["arbiter_transitions"] == {"serving_only": 4.0, "with_training": 4.0}
    for label in ("on#0", "on#1"):
        row = got["per_block"][label]
        assert row["yielded"] is True and row["resumed_after_s"] is not None and row["resumed_after_s"] < 0
        assert [c["to"] for c in got["state_changes"][label]] == ["YIELDING", "TRAINING"]
    assert got["clock_aligned_every_block"] is True
    json.dumps(_clean(got), allow_nan=False)


def test_spike_refuses_a_server_without_training(monkeypatch) -> None:
    monkeypatch.setattr(spike, "get_status", lambda url: {"weight_version": "v0", "disabled": {"train": "off"}})
    with pytest.raises(RuntimeError, match="train section"):
        spike.measure(FakeCtx(FakeServer()), "http://fake", dict(spike.QUICK))


def test_spike_is_registered_and_its_helpers_are_not() -> None:
    found = discover()
    assert found["spike"] is spike and "_spike_trace" not in {m.__name__.rsplit(".", 1)[-1] for m in found.values()}
