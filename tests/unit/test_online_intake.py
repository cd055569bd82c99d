"""online/intake.py: all-or-nothing offers, readiness on a fake clock, requeue order, state."""

from __future__ import annotations

import json

import pytest

from alchemist_sgl.errors import QueueFull
from alchemist_sgl.online.intake import PendingSample, SampleQueue, pick_lane


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def sample(i: int, at: float = 100.0, **kw) -> PendingSample:
    fields = dict(prompt_ids=[1, i], response_ids=[i, 2], kind="positive", weight=1.0,
                  prefill_version="v0", completion_id=f"c{i}", ref_logprobs=None, enqueued_at=at)
    fields.update(kw)
    return PendingSample(**fields)


def test_offer_is_all_or_nothing_and_raises_queue_full():
    q = SampleQueue(max_pending=4, clock=Clock())
    assert q.offer([sample(1), sample(2), sample(3)]) == 3
    with pytest.raises(QueueFull, match="3 pending \\+ 2 offered > train.max_pending_samples 4") as e:
        q.offer([sample(4), sample(5)])
    assert (e.value.pending, e.value.offered, e.value.max_pending) == (3, 2, 4)
    assert len(q) == 3  # nothing of the refused offer went in
    assert q.offer(iter([sample(4)])) == 1 and len(q) == 4


def test_lanes_fresh_oldest_then_newest_approximate_then_oldest_stale():
    """intake.py, Note [Lanes]: lags of the queue oldest first (None: a branch)."""
    assert pick_lane([], 1) == (None, "stale")
    assert pick_lane([2, 0, 1, 0], 1) == (1, "fresh")           # the oldest fresh one
    assert pick_lane([1, 3, 1, None], 1) == (2, "approximate")  # the newest within the bound
    assert pick_lane([1, 3, 1, None], 0) == (0, "stale")        # bound 0: the oldest, recomputed
    assert pick_lane([None, 5], 2) == (0, "stale")


def test_take_next_removes_by_lane_and_wait_of_the_oldest():
    clock = Clock()
    q = SampleQueue(max_pending=10, clock=clock)
    assert q.oldest_wait_s() == 0.0 and q.take_next(lambda p: 0, 0) is None
    q.offer([sample(1, at=clock.t), sample(2, at=clock.t), sample(3, at=clock.t)])
    clock.t += 5.0
    assert q.oldest_wait_s() == 5.0
    lags = {1: 1, 2: 0, 3: 1}
    lag_of = lambda p: lags[p.prompt_ids[1]]  # noqa: E731
    assert q.has_fresh(lag_of)
    p, lane = q.take_next(lag_of, 1)
    assert (p.prompt_ids[1], lane) == (2, "fresh") and not q.has_fresh(lag_of)
    p, lane = q.take_next(lag_of, 1)
    assert (p.prompt_ids[1], lane) == (3, "approximate")
    gone = q.remove_where(lambda p: p.prompt_ids[1] == 1)
    assert [g.prompt_ids[1] for g in gone] == [1] and len(q) == 0


def test_take_oldest_first_and_requeue_front_keeps_order():
    q = SampleQueue(max_pending=5, clock=Clock())
    q.offer([sample(i) for i in range(5)])
    batch = q.take(3)
    assert [s.completion_id for s in batch] == ["c0", "c1", "c2"]
    q.offer([sample(5), sample(6)])  # new arrivals while the step ran
    q.requeue_front(batch)  # step abandoned: may exceed the bound, never drops
    assert len(q) == 7
    assert [s.completion_id for s in q.take(10)] == ["c0", "c1", "c2", "c3", "c4", "c5", "c6"]
    assert q.take(2) == []


def test_state_round_trips_without_handles():
    q = SampleQueue(max_pending=5, clock=Clock())
    pin = object()
    q.offer([sample(1, handle=pin, kind="negative", weight=0.5, ref_logprobs=[-0.1, -0.2]),
             sample(2, prefill_version=None, completion_id=None, source="feedback")])
    state = q.state()
    assert all("handle" not in d for d in state)
    restored = SampleQueue(max_pending=5, clock=Clock())
    restored.load_state(json.loads(json.dumps(state)))  # JSON-able
    got = restored.take(5)
    assert got == [sample(1, kind="negative", weight=0.5, ref_logprobs=[-0.1, -0.2]),
                   sample(2, prefill_version=None, completion_id=None, source="feedback")]
    assert got[0].handle is None


@pytest.mark.parametrize("bad", [dict(kind="neutral"), dict(weight=0.0), dict(weight=float("nan")),
                                 dict(response_ids=[]), dict(ref_logprobs=[-1.0])])
def test_invalid_samples_are_refused(bad):
    with pytest.raises(ValueError):
        sample(1, **bad)
