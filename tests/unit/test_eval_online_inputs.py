"""The ``online`` experiment's inputs: the delayed feedback feeder (due times, exponential delays,
retries, what ``stop`` posts and drops), the prompt-heavy workload, the three-arm block orders and
``run_ab`` following them, and the ``--workload`` / ``--feedback-delay`` options reaching the
context. No HTTP, no model, no sleeps: time is a settable clock."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import eval.loadgen.ab as ab_module
from eval.cli import build_parser
from eval.context import RunContext
from eval.loadgen.ab import Arm, rotation_orders, run_ab
from eval.loadgen.arrivals import ArrivalSpec
from eval.loadgen.feedback_feeder import FeedbackFeeder
from eval.loadgen.runner import LoadResult, LoadSpec
from eval.loadgen.workloads import PROMPT_HEAVY_SYSTEM, Conversation, prompt_heavy
from tests.support.clocks import Clock


# ------------------------------------------------------------------------------------------ feeder
def test_feeder_at_once_posts_on_pump_and_measures_stamp_to_feedback() -> None:
    clock, sent = Clock(), []
    f = FeedbackFeeder("http://x", clock=clock, post=lambda b: (sent.append(b), (200, {"ok": True}))[1])
    f.put("c1")
    clock.advance(0.3)
    assert f.pump(clock()) == 1 and sent == [{"completion_id": "c1", "rating": "up"}]
    assert f.accepted == 1 and f.stamp_to_feedback_s == [pytest.approx(0.3)] and f.delays_s == [0.0]
    f.put("")  # no id: nothing queued
    assert f.waiting == 0


def test_feeder_delays_are_exponential_and_wait_for_their_time() -> None:
    clock = Clock()
    f = FeedbackFeeder("http://x", delay_mean_s=20.0, seed=3, clock=clock, post=lambda b: (200, {}))
    draws = [f.draw_delay() for _ in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(20.0, rel=0.06)
    assert min(draws) >= 0 and sum(1 for d in draws if d > 20.0) / len(draws) == pytest.approx(math.exp(-1), abs=0.03)
    g = FeedbackFeeder("http://x", delay_mean_s=20.0, seed=3, clock=clock, post=lambda b: (200, {}))
    g.put("a")
    g.put("b")
    first, second = sorted(g.delays_s)
    assert g.pump(clock() + first - 1e-6) == 0
    assert g.pump(clock() + first) == 1 and g.pump(clock() + second) == 1 and g.accepted == 2
    with pytest.raises(ValueError):
        FeedbackFeeder("http://x", delay_mean_s=-1.0)


def test_feeder_retries_409_and_429_refuses_the_rest_and_stop_drops_what_is_not_due() -> None:
    clock = Clock()
    answers = {"a": [(409, {}), (200, {})], "b": [(429, {}), (429, {}), (200, {})],
               "c": [(422, {"error": "rating: bad"})], "d": [(404, {"detail": "Not Found"})], "late": [(200, {})]}
    f = FeedbackFeeder("http://x", clock=clock, retry_s=0.25, backoff_s=0.5,
                       post=lambda body: answers[body["completion_id"]].pop(0))
    for cid in "abcd":
        f.put(cid)
    assert f.pump(clock()) == 4
    assert f.rejected == 2 and "http 422" in f.errors[0] and "feedback route unavailable" in f.errors[1]
    clock.advance(0.25)
    assert f.pump(clock()) == 1 and f.accepted == 1  # a after retry_s; b backs off 0.5 s
    clock.advance(0.25)
    assert f.pump(clock()) == 1 and f.accepted == 1  # b's second 429: 1.0 s more
    clock.advance(0.9)
    assert f.pump(clock()) == 0
    clock.advance(0.1)
    assert f.pump(clock()) == 1 and f.accepted == 2 and f.retries == 3
    f.put("late")
    assert f.stop() == 0 and f.posts == 8  # due at once: posted by stop, not dropped
    h = FeedbackFeeder("http://x", delay_mean_s=50.0, clock=clock, post=lambda b: (200, {}))
    h.put("x")
    assert h.stop() == 1 and h.unsent == 1 and h.accepted == 0


# ------------------------------------------------------------------------------------------ workload, orders, CLI
def test_prompt_heavy_builds_long_single_turn_prompts_deterministically() -> None:
    src = [Conversation(f"c{i}", tuple(f"human {i} says word{j} " * 5 for j in range(4)),
                        tuple(f"reply {i} word{j} " * 4 for j in range(4))) for i in range(30)]
    convs = prompt_heavy(src, count=40, min_words=290, max_words=400, seed=1)
    assert len(convs) == 40 and all(len(c.human_turns) == 1 and c.system == PROMPT_HEAVY_SYSTEM for c in convs)
    assert all(290 <= c.meta["words"] <= 400 for c in convs)
    assert all(c.meta["words"] + 3 <= len(c.human_turns[0].split()) <= c.meta["words"] + 16 for c in convs)
    assert len({c.human_turns[0] for c in convs}) == 40
    assert prompt_heavy(src, count=40, seed=1) == convs and prompt_heavy(src, count=40, seed=2) != convs
    with pytest.raises(ValueError):
        prompt_heavy([], count=4)


def test_rotation_orders_put_every_arm_early_and_late() -> None:
    orders = rotation_orders(["S", "R", "C"], 6)
    assert ["".join(o) for o in orders] == ["SRC", "CRS", "RCS", "SCR", "CSR", "RSC"]
    for arm in "SRC":
        assert sorted(o.index(arm) for o in orders) == [0, 0, 1, 1, 2, 2]
    for k in (0, 2, 4):  # each pair of rounds: every pair of arms in both orders
        for a, b in (("S", "R"), ("R", "C"), ("S", "C")):
            assert (orders[k].index(a) < orders[k].index(b)) != (orders[k + 1].index(a) < orders[k + 1].index(b))


def test_run_ab_follows_the_given_orders_and_refuses_bad_ones(monkeypatch) -> None:
    monkeypatch.setattr(ab_module, "flush_cache", lambda url: 1)
    seen: list[tuple[str, int]] = []

    def run_block(url: str, convs: Any, spec: LoadSpec) -> LoadResult:
        seen.append((spec.label, spec.seed))
        return LoadResult(spec.label, [], 1.0, 0, None)

    arms = [Arm(n, "http://x") for n in ("a", "b", "c")]
    spec = LoadSpec(ArrivalSpec(1.0), 4, seed=7)
    out = run_ab(arms, [Conversation("x", ("hi",))], spec, 2, run_block, orders=[["c", "a", "b"], ["b", "a", "c"]])
    assert seen == [("c#0", 7), ("a#0", 7), ("b#0", 7), ("b#1", 8), ("a#1", 8), ("c#1", 8)]
    assert out.order == ["c", "a", "b", "b", "a", "c"]
    with pytest.raises(ValueError, match="every arm once"):
        run_ab(arms, [Conversation("x", ("hi",))], spec, 2, run_block, orders=[["a", "b", "c"], ["a", "b"]])


def test_cli_options_reach_the_context(tmp_path: Path) -> None:
    args = build_parser().parse_args(["run", "online", "--workload", "prompt-heavy", "--feedback-delay", "20"])
    assert args.workload == "prompt-heavy" and args.feedback_delay == 20.0
    assert build_parser().parse_args(["run", "online"]).feedback_delay == 0.0
    for bad in (["--feedback-delay", "-1"], ["--workload", "long"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["run", "online", *bad])
    data = tmp_path / "convs.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hello there " * 30},
                                                   {"from": "gpt", "value": "hi " * 30}]}] * 5))
    ctx = RunContext("online", Path("x.yaml"), data, None, tmp_path, True, workload_name="prompt-heavy")
    convs = ctx.workload()
    assert convs and all(len(c.human_turns) == 1 and c.system == PROMPT_HEAVY_SYSTEM for c in convs)
    assert len(RunContext("online", Path("x.yaml"), data, None, tmp_path, True).workload()) == 5
