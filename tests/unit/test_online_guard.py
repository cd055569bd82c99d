"""online/guard.py and feedback_guard.py: the feedback guard's test, its decision, the rollback
it makes, and the registry's ``guarded`` state (persisted, lineage, restore)."""

from __future__ import annotations

import math

import pytest

from alchemist_sgl.config import GuardConfig
from alchemist_sgl.online.feedback_guard import FeedbackGuard
from alchemist_sgl.online.guard import Ratings, adjusted_z, guard_verdict
from alchemist_sgl.online.loop_types import LoopCounters
from alchemist_sgl.online.versions import VersionRegistry

Z95 = 1.6448536269514715  # the standard normal's 0.95 quantile (tables: 1.6449)
Z90 = 1.2815515655446004  # its 0.90 quantile (tables: 1.2816)


# ---------------------------------------------------------------- the statistic
def test_z_by_hand_all_down_against_all_up():
    # p_v = 5/6, p_p = 1/6; variance 2 * (5/6 * 1/6) / 6 = 5/108; z = (2/3) / sqrt(5/108) = sqrt(9.6)
    z = adjusted_z(Ratings(up=0, down=4), Ratings(up=4, down=0), 0.0)
    assert z == pytest.approx(math.sqrt(9.6), rel=1e-12)
    assert z == pytest.approx(3.0984, abs=1e-4)


def test_z_by_hand_with_a_margin():
    # V: 10 down of 20 -> p_v = 11/22 = 1/2; P: 5 down of 20 -> p_p = 6/22 = 3/11;
    # variance 1/4/22 + (3/11)(8/11)/22 = 1/88 + 12/1331; numerator 1/2 - 3/11 - 1/10 = 7/55
    v, p = Ratings(up=10, down=10), Ratings(up=15, down=5)
    se = math.sqrt(1 / 88 + 12 / 1331)
    assert adjusted_z(v, p, 0.1) == pytest.approx((7 / 55) / se, rel=1e-12)
    assert adjusted_z(v, p, 0.1) == pytest.approx(0.8915, abs=1e-4)
    assert adjusted_z(v, p, 0.0) == pytest.approx((5 / 22) / se, rel=1e-12)  # 1.5921


def test_below_and_above_the_threshold():
    v, p = Ratings(up=10, down=10), Ratings(up=15, down=5)  # z = 1.5921 with no margin
    kw = dict(min_ratings=20, max_increase=0.0)
    below = guard_verdict(v, p, alpha=0.05, **kw)
    assert not below.fires and below.threshold == pytest.approx(Z95, abs=1e-12)
    assert below.z == pytest.approx(1.5921, abs=1e-4)
    above = guard_verdict(v, p, alpha=0.10, **kw)  # 1.5921 > 1.2816
    assert above.fires and above.threshold == pytest.approx(Z90, abs=1e-12)
    # the margin takes it back under: 0.8915 < 1.2816
    assert not guard_verdict(v, p, alpha=0.10, min_ratings=20, max_increase=0.1).fires
    strong = guard_verdict(Ratings(0, 4), Ratings(4, 0), min_ratings=4, max_increase=0.0, alpha=0.05)
    assert strong.fires and strong.z == pytest.approx(math.sqrt(9.6))


def test_a_better_version_never_fires():
    v, p = Ratings(up=4, down=0), Ratings(up=0, down=4)
    verdict = guard_verdict(v, p, min_ratings=4, max_increase=0.0, alpha=0.5)  # threshold 0
    assert verdict.z == pytest.approx(-math.sqrt(9.6)) and not verdict.fires


@pytest.mark.parametrize("v, p", [(Ratings(0, 3), Ratings(4, 0)), (Ratings(0, 4), Ratings(3, 0)),
                                  (Ratings(0, 0), Ratings(0, 0))])
def test_min_ratings_not_met_on_either_side_never_tests(v, p):
    verdict = guard_verdict(v, p, min_ratings=4, max_increase=0.0, alpha=0.5)
    assert not verdict.fires and verdict.z is None and "too few ratings" in verdict.reason


def test_both_sides_at_exactly_min_ratings_are_tested():
    verdict = guard_verdict(Ratings(0, 4), Ratings(4, 0), min_ratings=4, max_increase=0.0, alpha=0.05)
    assert verdict.z is not None and verdict.fires


@pytest.mark.parametrize("d_v, n_v, d_p, n_p", [(5, 5, 5, 5), (0, 5, 0, 5), (0, 1, 0, 1), (1, 1, 0, 1)])
def test_unanimous_sides_give_a_finite_z(d_v, n_v, d_p, n_p):
    """No sample variance (all up or all down): the pseudo-counts keep the variance positive."""
    v, p = Ratings(n_v - d_v, d_v), Ratings(n_p - d_p, d_p)
    z = adjusted_z(v, p, 0.0)
    assert math.isfinite(z)
    if d_v / n_v == d_p / n_p and n_v == n_p:
        assert z == 0.0
    # (1 of 1) vs (0 of 1): p_v = 2/3, p_p = 1/3, variance 2 * (2/9) / 3 = 4/27; z = (1/3)/sqrt(4/27)
    if (d_v, n_v, d_p, n_p) == (1, 1, 0, 1):
        assert z == pytest.approx((1 / 3) / math.sqrt(4 / 27))  # 0.866: one rating proves nothing


def test_ratings_as_status():
    assert Ratings(3, 1).as_status() == {"up": 3, "down": 1, "n": 4, "down_rate": 0.25}
    assert Ratings().as_status() == {"up": 0, "down": 0, "n": 0, "down_rate": None}


# ---------------------------------------------------------------- the guard at work
class FakeLoop:
    """The loop's rollback as VersionKeeper.serve_again does it to the registry: a new id whose
    parent is the target."""

    def __init__(self, registry: VersionRegistry) -> None:
        self.registry, self.counters = registry, LoopCounters()
        self.rollbacks: list[str] = []
        self.checkpoints = 0
        self.error: Exception | None = None

    def rollback(self, to: str) -> dict:
        if self.error is not None:
            raise self.error
        self.rollbacks.append(to)
        target = self.registry.get(to)
        v = self.registry.mint(step=target.step, parent=to, metric=target.metric)
        return {"weight_version": v.name, "parent": to, "stall_ms": 0.0}

    def checkpoint(self, *, is_blocking: bool = False) -> None:
        self.checkpoints += 1


class Source:
    def __init__(self) -> None:
        self.counts: dict[str, tuple[int, int]] = {}
        self.reads = 0

    def __call__(self) -> dict[str, tuple[int, int]]:
        self.reads += 1
        return dict(self.counts)


ON = GuardConfig(is_enabled=True, min_ratings=4, max_increase=0.0, alpha=0.05)


@pytest.fixture
def rig(tmp_path):
    reg = VersionRegistry(tmp_path / "versions.json")
    reg.mint(step=1, parent="v0")  # v1 serves, trained from v0
    loop, source = FakeLoop(reg), Source()
    return reg, loop, source, FeedbackGuard(config=ON, loop=loop, ratings=source)


def test_a_worse_version_is_rolled_back_once_with_its_evidence(tmp_path, rig):
    reg, loop, source, guard = rig
    assert guard.on_polled(0) is None and source.reads == 1  # the first poll checks
    source.counts = {"v0": (4, 0), "v1": (0, 4)}
    assert guard.on_polled(0) is None and source.reads == 1  # no rows taken: nothing new to judge
    answer = guard.on_polled(3)
    assert answer == {"weight_version": "v2", "parent": "v0", "stall_ms": 0.0}
    assert loop.rollbacks == ["v0"] and loop.counters.guarded == 1 and loop.checkpoints == 1
    v1, v2 = reg.get("v1"), reg.serving
    assert v1.state == "guarded" and (v2.name, v2.parent) == ("v2", "v0")
    ev = v1.guard
    assert ev is not None
    assert ev["parent"] == "v0" and ev["rolled_back_to"] == "v2"
    assert ev["ratings"] == {"up": 0, "down": 4, "n": 4, "down_rate": 1.0}
    assert ev["parent_ratings"] == {"up": 4, "down": 0, "n": 4, "down_rate": 0.0}
    assert ev["z"] == pytest.approx(math.sqrt(9.6)) and ev["threshold"] == pytest.approx(Z95)
    assert (ev["max_increase"], ev["alpha"], ev["min_ratings"]) == (0.0, 0.05, 4)
    # persisted: another registry on the file reads the same
    again = VersionRegistry(tmp_path / "versions.json").get("v1")
    assert again.state == "guarded" and again.guard == ev
    # v2 (v0's weights) has no ratings of its own: more rows never roll anything back again
    source.counts["v1"] = (0, 40)
    assert guard.on_polled(5) is None and loop.rollbacks == ["v0"]
    assert guard.ratings() == {"v0": (4, 0), "v1": (0, 40)}


def test_no_rollback_when_disabled_or_too_few_or_not_worse(tmp_path):
    for config, counts in [(GuardConfig(), {"v0": (4, 0), "v1": (0, 4)}),
                           (ON, {"v0": (4, 0), "v1": (0, 3)}),
                           (ON, {"v0": (0, 4), "v1": (0, 4)})]:
        reg = VersionRegistry(tmp_path / f"{id(config)}-{len(counts)}-{counts['v0']}.json")
        reg.mint(step=1, parent="v0")
        loop, source = FakeLoop(reg), Source()
        source.counts = counts
        guard = FeedbackGuard(config=config, loop=loop, ratings=source)
        assert guard.on_polled(4) is None
        assert loop.rollbacks == [] and reg.serving.name == "v1" and loop.counters.guarded == 0


def test_v0_has_no_parent_and_is_never_judged(tmp_path):
    reg = VersionRegistry(tmp_path / "versions.json")
    loop, source = FakeLoop(reg), Source()
    source.counts = {"v0": (0, 100)}
    assert FeedbackGuard(config=ON, loop=loop, ratings=source).on_polled(4) is None
    assert loop.rollbacks == []


def test_a_rollback_that_must_wait_is_tried_at_the_next_poll(rig):
    reg, loop, source, guard = rig
    source.counts = {"v0": (4, 0), "v1": (0, 4)}
    loop.error = RuntimeError("a chunked prefill is in flight; retry in a moment")
    assert guard.on_polled(4) is None and reg.serving.name == "v1"
    loop.error = None
    assert guard.on_polled(0)["weight_version"] == "v2"  # no new rows, still due
    assert reg.get("v1").state == "guarded"


def test_a_rollback_that_cannot_happen_is_not_tried_again(rig):
    reg, loop, source, guard = rig
    source.counts = {"v0": (4, 0), "v1": (0, 4)}
    loop.error = LookupError("the adapter of v0 is no longer kept")
    assert guard.on_polled(4) is None
    loop.error = None
    assert guard.on_polled(4) is None and loop.rollbacks == [] and reg.serving.name == "v1"
    assert reg.get("v1").state == "serving" and loop.counters.guarded == 0


# ---------------------------------------------------------------- the registry's guarded state
def test_only_a_retired_version_becomes_guarded(tmp_path):
    reg = VersionRegistry(tmp_path / "versions.json")
    reg.mint(step=1, parent="v0")
    with pytest.raises(ValueError, match="serving"):
        reg.mark_guarded("v1", {"z": 3.0})
    reg.mint(step=1, parent="v0", is_rejected=True)
    with pytest.raises(ValueError, match="rejected"):
        reg.mark_guarded("v2", {"z": 3.0})
    reg.mint(step=0, parent="v0")
    assert reg.mark_guarded("v1", {"z": 3.0}).state == "guarded"
    assert reg.status()[-2]["state"] == "guarded" and reg.status()[-2]["guard"] == {"z": 3.0}


def test_lag_across_a_guard_rollback(tmp_path):
    """v0 -> v1 (guarded) and v0 -> v2 (the rollback): recordings made at v1 are on another branch
    (lag None, recomputed), those at v0 are one hop back; nothing needs v1 treated as rejected."""
    reg = VersionRegistry(tmp_path / "versions.json")
    reg.mint(step=1, parent="v0")
    reg.mint(step=0, parent="v0")
    reg.mark_guarded("v1", {"z": 3.0})
    assert reg.lag("v1", "v2") is None and reg.lag("v0", "v2") == 1 and reg.lag("v2", "v2") == 0
    reg.mint(step=1, parent="v2")
    assert reg.lag("v1", "v3") is None and reg.lag("v0", "v3") == 2


def test_restore_keeps_the_guarded_state_and_its_evidence(tmp_path):
    reg = VersionRegistry(tmp_path / "versions.json")
    reg.mint(step=1, parent="v0")
    while_serving = reg.state()  # a checkpoint taken while v1 served
    reg.mint(step=0, parent="v0")
    after_rollback = reg.state()  # ... and one after the rollback, before v1 was marked
    reg.mark_guarded("v1", {"z": 3.0})
    reg.restore(after_rollback)
    assert reg.get("v1").state == "guarded" and reg.get("v1").guard == {"z": 3.0}
    assert reg.serving.name == "v2"
    reg.restore(while_serving)  # older than the rollback: v1 serves again, evidence kept
    assert reg.serving.name == "v1" and reg.get("v1").guard == {"z": 3.0}
    assert reg.get("v2").state == "retired"
    reg.mint(step=2, parent="v1")  # what a restored v1 trains into
    reg.mark_guarded("v1", {"z": 4.0})
    assert reg.lag("v1", "v3") == 1, "a guarded version is no lineage break for its own children"
