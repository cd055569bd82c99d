"""The ``online`` experiment's pure parts (status deltas, coverage, publish medians, radix hit rate),
its sample feeder (429 back-off, 422, limit) and its block alternation, against a fake server and a
fake ``ctx`` (no HTTP, no model)."""

from __future__ import annotations

import copy
import json
import math
import random
import threading
from typing import Any

import pytest

import eval.loadgen.ab as ab_module
from eval.cli import _clean
from eval.experiments import discover
from eval.experiments import online
from eval.loadgen.runner import LoadResult
from eval.loadgen.training import (CompletionSink, PublishLog, SampleFeeder, counter_delta, coverage, lag_delta,
                                   radix_hit_rate)
from eval.loadgen.workloads import Conversation

ONLINE_FIELDS = ("samples_per_s", "prompt_coverage", "reuse_by_lag", "publish_ms", "publish_stall_ms",
                 "radix_hit_rate_training_on", "radix_hit_rate_training_off", "ttft_p50_training_on",
                 "ttft_p50_training_off", "ttft_p95_training_on", "ttft_p95_training_off", "tpot_p50_training_on",
                 "tpot_p50_training_off", "failed_requests", "samples", "publishes")


# ------------------------------------------------------------------------------------------ pure parts
def test_lag_delta_uses_string_keys_sorted_and_drops_zeros() -> None:
    before = {"0": 100, "1": 5}
    after = {"0": 160, "1": 5, "2": 7, "10": 1}
    assert lag_delta(before, after) == {"0": 60, "2": 7, "10": 1}
    assert list(lag_delta(None, {"10": 1, "2": 3})) == ["2", "10"]
    assert lag_delta({0: 1}, {0: 4}) == {"0": 3}  # int keys (in-process) normalize to strings


def test_coverage_is_lag0_replayed_over_all_prompt_tokens_trained() -> None:
    b = {"replayed_tokens": 100, "recomputed_tokens": 50, "reuse_by_lag": {"0": 90, "1": 10}}
    a = {"replayed_tokens": 400, "recomputed_tokens": 150, "reuse_by_lag": {"0": 330, "1": 70}}
    cov = coverage(b, a)
    assert cov["prompt_tokens"] == 400
    assert cov["lag0"] == pytest.approx(240 / 400)
    assert cov["any_lag"] == pytest.approx(300 / 400)
    assert coverage({"replayed_tokens": 0}, {"replayed_tokens": 30, "recomputed_tokens": 10})["lag0"] == 0.75
    assert math.isnan(coverage({}, {})["lag0"])
    assert counter_delta({"steps": 2}, {"steps": 5}, "steps") == 3 and counter_delta({}, {}, "x") == 0


def test_publish_log_keeps_only_entries_made_after_the_baseline() -> None:
    log = PublishLog.starting_at({"recent": [{"version": "v1", "publish_ms": 999.0, "stall_ms": 999.0}]})
    log.add({"recent": [{"version": "v1", "publish_ms": 999.0, "stall_ms": 999.0},
                        {"version": "v2", "publish_ms": 10.0, "stall_ms": 1.0}]})
    log.add({"recent": [{"version": "v2", "publish_ms": 10.0, "stall_ms": 1.0},
                        {"version": "v3", "publish_ms": 30.0, "stall_ms": 3.0},
                        {"version": "v4", "publish_ms": 20.0, "stall_ms": 2.0}]})
    assert sorted(log.entries) == ["v2", "v3", "v4"]
    assert log.median("publish_ms") == 20.0 and log.median("stall_ms") == 2.0
    assert math.isnan(PublishLog().median("publish_ms"))


def test_radix_hit_rate_sums_tokens_over_successful_requests() -> None:
    recs = [{"prompt_tokens": 100, "cached_tokens": 80, "error": None},
            {"prompt_tokens": 300, "cached_tokens": 0, "error": None},
            {"prompt_tokens": 50, "cached_tokens": 50, "error": "boom"},
            {"prompt_tokens": 50, "cached_tokens": None, "error": None}]
    assert radix_hit_rate(recs) == pytest.approx(80 / 400)
    assert math.isnan(radix_hit_rate([]))


def test_completion_sink_hands_over_ids_and_posts_no_feedback() -> None:
    seen: list[str] = []
    sink = CompletionSink(sink=seen.append)
    assert sink.body("c1", "hello", random.Random(0)) is None
    assert seen == ["c1"]


# ------------------------------------------------------------------------------------------ feeder
def test_feeder_backs_off_on_429_then_counts_accepted() -> None:
    answers = [(429, {}), (429, {}), (200, {"accepted": 2})]
    calls: list[list[dict]] = []

    def post(samples: list[dict]) -> tuple[int, Any]:
        calls.append(samples)
        return answers.pop(0)

    f = SampleFeeder("http://x", limit=10, post=post, backoff_s=0.001)
    f.send(["a", "b"])
    assert f.accepted == 2 and f.retries_429 == 2 and len(calls) == 3
    assert calls[0] == [{"completion_id": "a", "rating": "up"}, {"completion_id": "b", "rating": "up"}]


def test_feeder_counts_422_and_respects_the_limit() -> None:
    f = SampleFeeder("http://x", limit=3, post=lambda s: (422, {"detail": "completion_id: unknown"}))
    f.send(["a"])
    assert f.rejected == 1 and f.accepted == 0 and "completion_id" in f.errors[0]
    g = SampleFeeder("http://x", limit=3, post=lambda s: (200, {"accepted": len(s)}))
    g.send(["a", "b"])
    g.send(["c", "d", "e"])
    assert g.accepted == 3
    g.send(["f"])
    assert g.accepted == 3


def test_feeder_thread_posts_what_was_put_before_stop() -> None:
    got: list[str] = []

    def post(samples: list[dict]) -> tuple[int, Any]:
        got.extend(x["completion_id"] for x in samples)
        return 200, {"accepted": len(samples)}

    f = SampleFeeder("http://x", limit=100, post=post)
    f.start()
    for i in range(20):
        f.put(f"c{i}")
    f.stop(drain_s=5.0)
    assert sorted(got) == sorted(f"c{i}" for i in range(20)) and f.accepted == 20 and f.dropped == 0


# ------------------------------------------------------------------------------------------ orchestration
class FakeServer:
    """Counters of /alchemist/status; trains a sample the moment it is accepted while not paused."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.paused = False
        self.version = 3
        self.train = {"steps": 0, "samples_trained": 0, "tokens_trained": 0, "samples_pending": 0,
                      "replayed_tokens": 0, "recomputed_tokens": 0, "stale_recomputes": 0,
                      "reuse_by_lag": {}, "loss_ema": None, "paused": False}
        self.publish = {"publishes": 0, "rejected": 0,
                        "recent": [{"version": "v3", "publish_ms": 1e6, "stall_ms": 1e6}]}
        self.controls: list[str] = []
        self.flushes = 0

    def status(self, url: str, timeout_s: float = 30.0) -> dict[str, Any]:
        with self.lock:
            return {"weight_version": f"v{self.version}", "train": dict(copy.deepcopy(self.train), paused=self.paused),
                    "publish": copy.deepcopy(self.publish)}

    def control(self, url: str, action: str, timeout_s: float = 60.0) -> None:
        self.controls.append(action)
        self.paused = action == "pause"

    def post(self, samples: list[dict]) -> tuple[int, Any]:
        assert not self.paused, "samples are fed during training-on blocks only"
        with self.lock:
            for _ in samples:
                self.train["samples_trained"] += 1
                self.train["steps"] += 1
                self.train["replayed_tokens"] += 90
                self.train["recomputed_tokens"] += 10
                self.train["reuse_by_lag"]["0"] = self.train["reuse_by_lag"].get("0", 0) + 90
                self.version += 1
                self.publish["publishes"] += 1
                self.publish["recent"] = (self.publish["recent"] + [
                    {"version": f"v{self.version}", "publish_ms": 40.0, "stall_ms": 4.0}])[-64:]
        return 200, {"accepted": len(samples)}


class FakeCtx:
    seed = 0
    quick = True

    def __init__(self, server: FakeServer) -> None:
        self.server_ = server
        self.blocks: list[tuple[str, bool, bool]] = []  # (label, paused during the block, fed)
        self.last_timeline: list[dict[str, float]] = []

    def workload(self, min_turns: int = 2) -> list[Conversation]:
        return [Conversation(f"c{i}", ("hi", "more")) for i in range(10)]

    def load(self, url: str, convs: Any, spec: Any, feedback: Any = None, poll_status: bool = False) -> LoadResult:
        on = not self.server_.paused
        self.blocks.append((spec.label, self.server_.paused, feedback is not None))
        records = []
        for i in range(spec.max_requests):
            cid = f"{spec.label}-{i}"
            records.append({"index": i, "start_s": float(i), "ttft_s": 0.2 if on else 0.1, "tpot_s": 0.02,
                            "e2e_s": 1.0, "itl_s": [0.02], "prompt_tokens": 100, "cached_tokens": 10 if on else 50,
                            "output_tokens": 32, "completion_id": cid, "error": None})
            if feedback is not None:
                feedback.body(cid, "text", random.Random(0))
        self.last_timeline = [{"t_s": 1.0, "train_steps": float(self.server_.train["steps"])}]
        return LoadResult(spec.label, records, 10.0, spec.max_requests, None)


def test_online_alternates_blocks_feeds_only_while_training_and_reports_every_field(monkeypatch) -> None:
    srv = FakeServer()
    monkeypatch.setattr(online, "get_status", srv.status)
    monkeypatch.setattr(online, "train_control", srv.control)
    monkeypatch.setattr(ab_module, "flush_cache", lambda url: setattr(srv, "flushes", srv.flushes + 1) or 1)
    ctx = FakeCtx(srv)
    p = dict(online.QUICK, rounds=2, per_block=5, samples=8)
    result = online.measure(ctx, "http://fake", p, post=srv.post)

    assert result["block_order"] == ["off", "on", "on", "off"]  # ABBA
    assert [(paused, fed) for _, paused, fed in ctx.blocks] == [(True, False), (False, True),
                                                                (False, True), (True, False)]
    assert srv.controls == ["pause", "resume", "pause", "resume", "pause", "resume"]  # last: left as found
    assert srv.flushes == 4 and result["radix_flushed_between_arms"] is True

    for key in ONLINE_FIELDS:
        assert key in result, key
    assert result["samples"] == 8 and result["publishes"] == 8 and result["samples_trained_while_off"] == 0
    assert result["prompt_coverage"] == pytest.approx(0.9)
    assert result["reuse_by_lag"] == {"0": 8 * 90}
    assert result["publish_ms"] == 40.0 and result["publish_stall_ms"] == 4.0  # the baseline v3 entry excluded
    assert result["radix_hit_rate_training_on"] == pytest.approx(0.1)
    assert result["radix_hit_rate_training_off"] == pytest.approx(0.5)
    assert result["ttft_p50_training_on"] == pytest.approx(200.0)
    assert result["ttft_p50_training_off"] == pytest.approx(100.0)
    assert result["tpot_p50_training_on"] == pytest.approx(20.0)
    assert result["failed_requests"] == 0 and result["requests_per_arm"] == 10
    assert result["samples_per_s"] == pytest.approx(8 / result["training_on_wall_s"])
    assert set(result["latency_samples"]) == {"training_on", "training_off"}
    assert len(result["latency_samples"]["training_on"]["ttft_s"]) == 10
    assert set(result["timeline"]) == set(result["per_block"]) == {"off#0", "on#0", "on#1", "off#1"}
    json.dumps(_clean(result), allow_nan=False)


def test_online_refuses_a_server_without_training(monkeypatch) -> None:
    monkeypatch.setattr(online, "get_status", lambda url: {"weight_version": "v0", "disabled": {"train": "off"}})
    with pytest.raises(RuntimeError, match="train section"):
        online.measure(FakeCtx(FakeServer()), "http://fake", dict(online.QUICK))


def test_online_is_registered() -> None:
    assert discover()["online"] is online
