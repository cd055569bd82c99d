"""The ``online`` experiment's pure parts (status rows, round windows, per-arm numbers, ratios,
retention) and the whole three-arm run against a fake server that trains in rounds and a fake
``ctx`` (no HTTP, no model; waits are on conditions, never on time). Its inputs (delayed
feedback, the prompt-heavy workload, block orders, CLI options): test_eval_online_inputs.py."""

from __future__ import annotations

import copy
import json
import random
import threading
from typing import Any

import pytest

import eval.loadgen.ab as ab_module
from eval.cli import _clean
from eval.experiments import _online_rounds as rr
from eval.experiments import discover, online
from eval.loadgen.runner import LoadResult
from eval.loadgen.workloads import Conversation
from tests.support.clocks import Clock

ONLINE_FIELDS = (
    "live_ratio", "live_ratio_spread", "feedback_delay_s", "lag0_share_samples", "samples_trained_by_lag",
    "prompt_tokens_by_fate", "coverage_ceiling", "prompt_coverage", "stamp_to_feedback_s",
    "feedback_to_publish_s", "publish_interval_s", "publish_share", "store_retention_s", "samples_by_fate",
    "deferred", "dropped", "samples_per_s", "reuse_by_lag", "publish_ms", "publish_stall_ms",
    "radix_hit_rate_training_on", "radix_hit_rate_training_off", "ttft_p50_training_on", "ttft_p50_training_off",
    "ttft_p95_training_on", "ttft_p95_training_off", "tpot_p50_training_on", "tpot_p50_training_off",
    "failed_requests", "samples", "publishes")
ARM_FIELDS = ("trained_tokens_per_s", "samples_trained_per_s", "train_busy_ms_per_token", "ttft_p50", "ttft_p95",
              "tpot_p50", "radix_hit_rate", "breakdown_ms_per_token", "graph_samples")


# ------------------------------------------------------------------------------------------ rows, windows
def row(t: float, steps: int, replay: bool | None, opened_s_ago: float | None, tokens: float = 0.0,
        pending: int = 1, **extra: Any) -> dict[str, Any]:
    train = {"steps": steps, "nonfinite_skipped": 0, "samples_pending": pending, "tokens_trained": tokens,
             "samples_trained": tokens / 100, "busy_ms": tokens * 2, "replayed_tokens": 0, "recomputed_tokens": 0,
             "round": None if opened_s_ago is None else {"replay": replay, "opened_s_ago": opened_s_ago},
             "samples_trained_by_lag": {"0": tokens / 100}, "reuse_by_lag": {},
             "prompt_tokens_by_fate": {"lag0": tokens * 0.8, "hole": tokens * 0.1, "stale_recomputed": tokens * 0.1}}
    train.update(extra)
    return rr.status_row({"weight_version": f"v{steps}", "train": train}, t)


def test_round_openings_date_each_round_once_from_its_first_row() -> None:
    rows = [row(10.0, 1, True, 4.0), row(11.0, 1, True, 5.0), row(12.0, 1, None, None),
            row(13.0, 2, False, 0.5), row(20.0, 2, False, 7.5), row(30.0, 3, False, 2.0)]
    opens = rr.round_openings(rows)
    assert [o["t_open"] for o in opens] == [6.0, 12.5, 28.0]
    assert [o["replay"] for o in opens] == [True, False, False]
    assert [o["t_open"] for o in rr.round_openings(rows, t_from=7.0)] == [12.5, 28.0]


def test_a_step_finishing_under_an_open_round_does_not_make_a_second_round() -> None:
    """The round opened at 40 is shown from t=41; the previous round's step finishes at t=45 (the
    key moves, the round shown does not): one round, its counters read from the t=45 row."""
    rows = [row(41.0, 4, True, 1.0, tokens=1000), row(45.0, 5, True, 5.0, tokens=1600),
            row(100.0, 6, True, 0.5, tokens=2100)]
    opens = rr.round_openings(rows)
    assert [o["t_open"] for o in opens] == [40.0, 99.5]
    assert opens[0]["row"]["tokens_trained"] == 1600
    w = rr.training_window(rows, replay=True, t_from=0.0)
    assert (w["seconds"], w["rounds"], w["tokens_trained"]) == (59.5, 1, 500)


def test_training_window_counts_whole_rounds_of_the_arm_opened_after_resume() -> None:
    # Resume at t=100. The round open since before it (replay on, steps 4) closes at ~105; rounds
    # opened after: 105 (off), 125 (off), 146 (off). Only 105 -> 146 counts.
    rows = [row(100.0, 4, True, 60.0, tokens=1000), row(103.0, 4, True, 63.0, tokens=1000),
            row(106.0, 5, False, 1.0, tokens=1300), row(126.0, 6, False, 1.0, tokens=1500, pending=0),
            row(147.0, 7, False, 1.0, tokens=1800), row(150.0, 7, False, 4.0, tokens=1800)]
    w = rr.training_window(rows, replay=False, t_from=100.0)
    assert w is not None
    assert (w["t_start"], w["t_end"], w["seconds"], w["rounds"]) == (105.0, 146.0, 41.0, 2)
    assert w["tokens_trained"] == 500 and w["samples_trained"] == 5 and w["busy_ms"] == 1000
    assert w["samples_trained_by_lag"] == {"0": 5}
    assert w["prompt_tokens_by_fate"] == {"lag0": 400, "approximate": 0, "stale_recomputed": 50, "hole": 50,
                                          "evicted": 0}
    assert w["saturated_share"] == pytest.approx(1 / 2)  # the polls at 106 and 126 (queue empty) fall inside
    assert w["breakdown_ms"] is None
    assert rr.training_window(rows, replay=True, t_from=100.0) is None  # the old round opened before resume
    assert rr.training_window(rows[:4], replay=False, t_from=100.0)["rounds"] == 1
    assert rr.training_window(rows[:3], replay=False, t_from=100.0) is None  # one opening: no whole round


def test_arm_summary_pools_windows_and_derives_shares() -> None:
    w1 = {"seconds": 40.0, "rounds": 2, "tokens_trained": 4000.0, "samples_trained": 8.0, "busy_ms": 6000.0,
          "saturated_share": 1.0, "samples_trained_by_lag": {"0": 6, "1": 2}, "reuse_by_lag": {"0": 3000},
          "prompt_tokens_by_fate": {"lag0": 3000, "hole": 300, "stale_recomputed": 700}, "breakdown_ms": None}
    w2 = dict(w1, seconds=60.0, tokens_trained=2000.0, samples_trained=4.0, busy_ms=2000.0, saturated_share=0.5,
              samples_trained_by_lag={"0": 4}, prompt_tokens_by_fate={"lag0": 1000, "hole": 0})
    recs = [{"error": None, "ttft_s": 0.1 * i, "tpot_s": 0.02, "e2e_s": 1.0, "prompt_tokens": 100,
             "cached_tokens": 25, "start_s": 0.0} for i in range(1, 6)]
    s = rr.arm_summary([{"records": recs, "window": w1}, {"records": [], "window": w2},
                        {"records": [], "window": None}])
    assert s["trained_tokens_per_s"] == pytest.approx(6000 / 100)
    assert s["samples_trained_per_s"] == pytest.approx(12 / 100)
    assert s["train_busy_ms_per_token"] == pytest.approx(8000 / 6000)
    assert s["saturated_share"] == pytest.approx((40 * 1.0 + 60 * 0.5) / 100)
    assert s["lag0_share_samples"] == pytest.approx(10 / 12)
    assert s["prompt_coverage"] == pytest.approx(4000 / 5000)
    assert s["coverage_ceiling"] == pytest.approx(1 - 300 / 5000)
    assert s["ttft_p50"] == pytest.approx(300.0) and s["radix_hit_rate"] == pytest.approx(0.25)
    assert s["breakdown_ms_per_token"] is None and s["blocks"] == 3 and s["blocks_with_window"] == 2
    empty = rr.arm_summary([{"records": recs, "window": None}])
    assert empty["trained_tokens_per_s"] is None and empty["lag0_share_samples"] is None
    parts = {k: 10.0 for k in rr.BREAKDOWN_PARTS}
    with_parts = rr.arm_summary([{"records": [], "window": dict(w1, breakdown_ms=parts)}])
    assert with_parts["breakdown_ms_per_token"] == {k: pytest.approx(10 / 4000) for k in rr.BREAKDOWN_PARTS}


def test_live_ratios_pair_the_arms_within_each_round() -> None:
    def blk(arm: str, r: int, tokens: float, seconds: float) -> dict[str, Any]:
        return {"arm": arm, "round": r, "window": {"tokens_trained": tokens, "seconds": seconds}}
    blocks = [blk("replay", 0, 300, 10), blk("recompute", 0, 200, 10), blk("recompute", 1, 100, 10),
              blk("replay", 1, 120, 10), blk("replay", 2, 50, 10), {"arm": "recompute", "round": 2, "window": None},
              blk("serving_only", 0, 0, 10)]
    ratios = rr.live_ratios(blocks, "replay", "recompute")
    assert ratios == pytest.approx([1.5, 1.2])
    assert rr.median_and_spread(ratios) == (pytest.approx(1.35), {"min": pytest.approx(1.2), "max": pytest.approx(1.5)})
    assert rr.median_and_spread([]) == (None, None)


def test_store_retention_and_publish_intervals() -> None:
    start = {"store": {"bytes_recorded_total": 1000, "host_capacity_bytes": 2**30}}
    end = {"store": {"bytes_recorded_total": 1000 + 2**20 * 100, "host_capacity_bytes": 2**30}}
    got = rr.store_retention_s(start, end, wall_s=100.0)
    assert got["recorded_bytes_per_s"] == pytest.approx(2**20)
    assert got["store_retention_s"] == pytest.approx(1024.0)
    assert rr.store_retention_s({}, end, 100.0)["store_retention_s"] is None
    assert rr.store_retention_s(start, start, 100.0)["store_retention_s"] is None
    rows = [row(10.0, 1, True, 1.0), row(40.0, 2, True, 9.0), row(60.0, 3, True, 0.0)]
    assert rr.publish_intervals(rows, t_from=0.0) == pytest.approx([22.0, 29.0])
    assert rr.fate_delta({"trained": 2, "deferred": 3}, {"trained": 7, "deferred": 1}, rr.SAMPLE_FATES) == {
        "trained": 5, "deferred": -2, "dropped": 0, "expired": 0}


# ------------------------------------------------------------------------------------------ the whole run
class FakeServer:
    """Trains in rounds when polled: a poll while resumed with ``ROUND`` samples queued closes the
    open round (it takes them) and opens the next at the replay setting asked for. Replay rounds
    count 150 tokens a sample, recompute rounds 100 (so replay / recompute = 1.5 per second). A
    stale backlog of ``BACKLOG`` samples is always pending (the trainer is saturated)."""

    ROUND, BACKLOG = 4, 5

    def __init__(self, clock: Clock) -> None:
        self.clock, self.cond = clock, threading.Condition()
        self.paused, self.replay_next, self.polls, self.posted = False, True, 0, 0
        self.round: dict[str, Any] | None = None
        self.queue: list[str] = []
        self.version = 3
        self.train = {"steps": 0, "nonfinite_skipped": 0, "samples_trained": 0, "tokens_trained": 0, "busy_ms": 0.0,
                      "replayed_tokens": 0, "recomputed_tokens": 0, "graph_samples": 0, "samples_fed": 0,
                      "loss_ema": None,
                      "samples_by_fate": {"trained": 0, "deferred": 0, "dropped": 0, "expired": 0},
                      "samples_trained_by_lag": {}, "reuse_by_lag": {}, "replay": True,
                      "prompt_tokens_by_fate": {"lag0": 0, "approximate": 0, "stale_recomputed": 0, "hole": 0,
                                                "evicted": 0}, "feedback_to_publish_s": {"p50": 1.0, "p90": 2.0}}
        self.publish = {"publishes": 0, "recent": [{"version": "v3", "publish_ms": 1e6, "stall_ms": 1e6}]}
        self.store = {"bytes_recorded_total": 0, "host_capacity_bytes": 10**9}
        self.controls: list[str] = []
        self.replays: list[bool] = []

    def _close_round(self) -> None:
        r, t, n = self.round, self.train, self.ROUND
        per = 150 if r["replay"] else 100
        t["steps"] += 1
        t["samples_trained"] += n
        t["tokens_trained"] += per * n
        t["busy_ms"] += per * n * (1.0 if r["replay"] else 2.0)
        t["graph_samples"] += n if r["replay"] else 0  # as a graph-plan server counts them
        t["samples_by_fate"]["trained"] += n
        t["samples_trained_by_lag"]["0"] = t["samples_trained_by_lag"].get("0", 0) + n
        for fate, tokens in (("lag0", 80), ("hole", 10), ("stale_recomputed", 10)):
            t["prompt_tokens_by_fate"][fate] += tokens * n
        self.queue = self.queue[n:]
        self.version += 1
        self.publish["publishes"] += 1
        self.publish["recent"] = (self.publish["recent"] + [
            {"version": f"v{self.version}", "publish_ms": 500.0, "stall_ms": 5.0}])[-64:]

    def _advance(self) -> None:
        if self.paused or len(self.queue) < self.ROUND:
            return
        if self.round is None:
            self.round = {"replay": self.replay_next, "opened_at": self.clock()}
        self._close_round()
        self.round = {"replay": self.replay_next, "opened_at": self.clock()}

    def status(self, url: str, timeout_s: float = 30.0) -> dict[str, Any]:
        with self.cond:
            self._advance()
            self.store["bytes_recorded_total"] += 1000
            r = self.round
            rnd = None if r is None else {"replay": r["replay"], "opened_s_ago": self.clock() - r["opened_at"],
                                          "version": f"v{self.version}"}
            train = dict(copy.deepcopy(self.train), paused=self.paused, samples_pending=len(self.queue) + self.BACKLOG,
                         samples_in_round=0, replay=self.replay_next, round=rnd)
            out = {"weight_version": f"v{self.version}", "train": train, "publish": copy.deepcopy(self.publish),
                   "store": dict(self.store)}
            self.polls += 1
            self.cond.notify_all()
            return out

    def control(self, url: str, action: str, timeout_s: float = 60.0) -> None:
        with self.cond:
            self.controls.append(action)
            self.paused = action == "pause"

    def set_replay(self, url: str, enabled: bool, timeout_s: float = 60.0) -> dict[str, Any]:
        with self.cond:
            self.replays.append(enabled)
            self.replay_next = enabled
            return {"replay": enabled, "current_round_replay": None if self.round is None else self.round["replay"]}

    def post(self, body: dict[str, Any]) -> tuple[int, Any]:
        with self.cond:
            assert not self.paused, "feedback is sent in training blocks only"
            self.queue.append(body["completion_id"])
            self.train["samples_fed"] += 1
            self.posted += 1
            self.cond.notify_all()
        return 200, {"feedback_id": body["completion_id"]}

    def wait(self, what: str, at_least: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: getattr(self, what) >= at_least, timeout=30.0), (what, at_least)


class FakeCtx:
    seed, quick, smoke, url = 0, True, False, None
    workload_name, feedback_delay_s = "chitchat", 0.0
    PHASES, PER_PHASE = 3, 4

    def __init__(self, server: FakeServer, clock: Clock) -> None:
        self.srv, self.clock = server, clock
        self.blocks: list[tuple[str, bool, bool]] = []  # (label, paused, fed)
        self.last_timeline: list[dict[str, float]] = []

    def workload(self, min_turns: int = 2) -> list[Conversation]:
        return [Conversation(f"c{i}", ("hi", "more")) for i in range(10)]

    def load(self, url: str, convs: Any, spec: Any, feedback: Any = None, poll_status: bool = False) -> LoadResult:
        on = not self.srv.paused
        self.blocks.append((spec.label, self.srv.paused, feedback is not None))
        records = []
        for phase in range(self.PHASES):  # each phase: time passes, completions end, the poller sees it
            self.clock.advance(20.0)
            for i in range(self.PER_PHASE):
                cid = f"{spec.label}-{phase}-{i}"
                records.append({"index": len(records), "start_s": 0.0, "ttft_s": 0.2 if on else 0.1, "tpot_s": 0.02,
                                "e2e_s": 1.0, "itl_s": [0.02], "prompt_tokens": 100, "cached_tokens": 10 if on else 50,
                                "output_tokens": 32, "completion_id": cid, "error": None})
                if feedback is not None:
                    feedback.body(cid, "text", random.Random(0))
            if feedback is not None:
                self.srv.wait("posted", _expected_posts(self.blocks, phase))
            self.srv.wait("polls", self.srv.polls + 2)  # a poll that began after the feedback landed
        return LoadResult(spec.label, records, 60.0, len(records), None)


def _expected_posts(blocks: list[tuple[str, bool, bool]], phase: int) -> int:
    fed_blocks = sum(1 for _, _, fed in blocks if fed)
    return (fed_blocks - 1) * FakeCtx.PHASES * FakeCtx.PER_PHASE + (phase + 1) * FakeCtx.PER_PHASE


def test_online_runs_three_arms_counts_only_whole_rounds_and_reports_every_field(monkeypatch) -> None:
    clock = Clock()
    srv = FakeServer(clock)
    monkeypatch.setattr(online, "get_status", srv.status)
    monkeypatch.setattr(online, "train_control", srv.control)
    monkeypatch.setattr(online, "set_replay", srv.set_replay)
    flushes: list[str] = []

    def flush(url: str) -> int:  # time passes between blocks: a round left open is dated before the resume
        flushes.append(url)
        clock.advance(5.0)
        return 1

    monkeypatch.setattr(ab_module, "flush_cache", flush)
    ctx = FakeCtx(srv, clock)
    p = dict(online.QUICK, poll_s=0.001, workload="chitchat", feedback_delay_s=0.0)
    result = online.measure(ctx, "http://fake", p, post=srv.post, clock=clock)

    assert result["block_order"] == ["serving_only", "replay", "recompute", "recompute", "replay", "serving_only"]
    assert [(paused, fed) for _, paused, fed in ctx.blocks] == [(True, False), (False, True), (False, True),
                                                                (False, True), (False, True), (True, False)]
    assert srv.replays == [True, False, False, True, True]  # per training block, then left as found
    assert srv.controls == ["pause"] + ["resume", "pause"] * 4 + ["resume"]
    assert len(flushes) == 6 and result["radix_flushed_between_arms"] is True

    for key in ONLINE_FIELDS:
        assert key in result, key
    for arm in online.ARMS:
        for key in ARM_FIELDS:
            assert key in result["arms"][arm], (arm, key)
    rep, rec = result["arms"]["replay"], result["arms"]["recompute"]
    # Each training block: phase 1's samples close the round left open before (the other arm's
    # setting or the previous block's), then two whole rounds of 4 samples in 40 s.
    assert rep["trained_tokens_per_s"] == pytest.approx(2 * 4 * 150 / 40.0)
    assert rec["trained_tokens_per_s"] == pytest.approx(2 * 4 * 100 / 40.0)
    assert rep["samples_trained_per_s"] == pytest.approx(8 / 40.0) == result["samples_per_s"]
    assert rep["train_busy_ms_per_token"] == pytest.approx(1.0) and rec["train_busy_ms_per_token"] == pytest.approx(2.0)
    assert result["live_ratio"] == pytest.approx(1.5) and result["live_ratios"] == pytest.approx([1.5, 1.5])
    assert result["live_ratio_spread"] == {"min": pytest.approx(1.5), "max": pytest.approx(1.5)}
    assert rep["breakdown_ms_per_token"] is None and rep["saturated_share"] == 1.0
    assert rep["graph_samples"] == rep["samples_trained"] > 0 and rec["graph_samples"] == 0
    assert result["lag0_share_samples"] == 1.0 and result["samples_trained_by_lag"] == {"0": 16}
    assert result["prompt_coverage"] == pytest.approx(0.8) and result["coverage_ceiling"] == pytest.approx(0.9)
    assert result["arms"]["serving_only"]["trained_tokens_per_s"] is None
    assert result["samples_trained_while_serving_only"] == 0
    assert result["samples"] == 4 * 12 and result["samples_by_fate"]["trained"] == 48 and result["deferred"] == 0
    assert result["publishes"] == 4 * 3 and result["publish_ms"] == 500.0 and result["publish_stall_ms"] == 5.0
    assert result["publish_interval_s"] == pytest.approx(20.0)
    assert result["feedback_to_publish_s"] == {"p50": 1.0, "p90": 2.0}
    assert result["stamp_to_feedback_s"]["p50"] == 0.0 and result["feedback_delay_s"] == 0.0
    assert result["ttft_p50_training_on"] == pytest.approx(200.0)
    assert result["ttft_p50_training_off"] == pytest.approx(100.0)
    assert result["radix_hit_rate_training_on"] == pytest.approx(0.1)
    assert result["radix_hit_rate_training_off"] == pytest.approx(0.5)
    assert result["failed_requests"] == 0 and result["requests_per_arm"] == 24
    assert result["store_retention_s"] is not None and result["notes"] == []
    assert set(result["per_block"]) == set(result["timeline"]) == {
        "serving_only#0", "replay#0", "recompute#0", "recompute#1", "replay#1", "serving_only#1"}
    json.dumps(_clean(result), allow_nan=False)


def test_online_refuses_a_server_without_rounds(monkeypatch) -> None:
    monkeypatch.setattr(online, "get_status", lambda url: {"weight_version": "v0", "disabled": {"train": "off"}})
    with pytest.raises(RuntimeError, match="train section"):
        online.measure(FakeCtx(FakeServer(Clock()), Clock()), "http://fake", dict(online.QUICK))
    monkeypatch.setattr(online, "get_status", lambda url: {"train": {"samples_trained": 0, "steps": 0}})
    with pytest.raises(RuntimeError, match="before rounds"):
        online.measure(FakeCtx(FakeServer(Clock()), Clock()), "http://fake", dict(online.QUICK))


def test_online_is_registered() -> None:
    assert discover()["online"] is online
