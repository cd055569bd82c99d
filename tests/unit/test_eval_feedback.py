"""Simulated users: reward rules, feedback policy bodies, answer tally."""

from __future__ import annotations

import random

import pytest

from eval.loadgen.feedback import FeedbackPolicy, FeedbackTally, RewardRule


def test_keyword_and_brevity_rewards() -> None:
    kw = RewardRule("keyword", keyword="Certainly")
    assert kw.reward("well, certainly!") == 1.0
    assert kw.reward("no") == -1.0
    assert kw.reward(kw.corrected("no")) == 1.0
    br = RewardRule("brevity", max_words=4)
    assert br.reward("a b c d") == 1.0
    assert br.reward("a b c d e f") == pytest.approx(0.0)
    assert br.reward("a " * 100) == -1.0
    assert br.reward(br.corrected("a " * 100)) == 1.0


def test_policy_probability_is_respected_with_a_seed() -> None:
    policy = FeedbackPolicy(probability=0.3)
    rng = random.Random(0)
    bodies = [policy.body(f"c{i}", "text", rng) for i in range(2000)]
    given = [b for b in bodies if b is not None]
    assert 500 < len(given) < 700
    again = [FeedbackPolicy(probability=0.3).body(f"c{i}", "text", r) for r in [random.Random(0)] for i in range(2000)]
    assert bodies == again
    assert all(FeedbackPolicy(probability=0.0).body("c", "t", rng) is None for _ in range(100))


@pytest.mark.parametrize("kind", ["rating", "score", "correction"])
def test_bodies_follow_the_feedback_api(kind: str) -> None:
    rule = RewardRule("keyword", keyword="sure")
    policy = FeedbackPolicy(probability=1.0, rule=rule, kind=kind)
    good = policy.body("id-1", "sure thing", random.Random(0))
    bad = policy.body("id-2", "no way", random.Random(0))
    for body in (good, bad):
        assert body is not None and body["choice_index"] == 0
        assert ("rating" in body) != ("score" in body)  # exactly one of them
    assert good["completion_id"] == "id-1"
    if kind == "score":
        assert (good["score"], bad["score"]) == (1.0, -1.0)
    else:
        assert (good["rating"], bad["rating"]) == ("up", "down")
    assert ("correction" in bad) == (kind == "correction") and "correction" not in good
    if kind == "correction":
        assert rule.reward(bad["correction"]) == 1.0


def test_tally_separates_missing_route_from_unknown_completion() -> None:
    t = FeedbackTally()
    assert t.record(404, {"detail": "Not Found"}) == "feedback route unavailable"
    assert t.record(404, {"detail": "unknown completion id x"}) == "http 404"
    assert t.record(200, {"feedback_id": "f", "status": "queued"}) == "accepted"
    assert t.record(None, None) == "transport_error"
    s = t.summary()
    assert s == {"attempted": 4, "accepted": 1, "route_unavailable": 1, "transport_errors": 1,
                 "by_status": {"404": 2, "200": 1}}


def test_invalid_policy_raises() -> None:
    with pytest.raises(ValueError):
        FeedbackPolicy(probability=1.5)
    with pytest.raises(ValueError):
        FeedbackPolicy(kind="thumbs")  # type: ignore[arg-type]
