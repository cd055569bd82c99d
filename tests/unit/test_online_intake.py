"""online/intake.py: all-or-nothing offers, readiness on a fake clock, requeue order, state."""

from __future__ import annotations

import json

import pytest

from alchemist_sgl.errors import QueueFull
from alchemist_sgl.online.intake import PendingSample, SampleQueue


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


def test_readiness_by_count_or_by_age_of_the_oldest():
    clock = Clock()
    q = SampleQueue(max_pending=10, clock=clock)
    assert not q.is_ready(min_pending=1, max_wait_s=0.0)  # empty is never ready
    assert q.oldest_wait_s() == 0.0
    q.offer([sample(1, at=clock.t)])
    clock.t += 5.0
    q.offer([sample(2, at=clock.t)])
    assert q.oldest_wait_s() == 5.0
    assert not q.is_ready(min_pending=3, max_wait_s=30.0)
    assert q.is_ready(min_pending=2, max_wait_s=30.0)
    clock.t += 24.9
    assert not q.is_ready(min_pending=3, max_wait_s=30.0)
    clock.t += 0.1
    assert q.is_ready(min_pending=3, max_wait_s=30.0)


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
